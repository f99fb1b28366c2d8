# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Training: the reference run
#
# Train the autoencoder on the training split, with the held-out split checked at every checkpoint. The
# defaults are the reference run: the `sd` model on flickr8k at 128 px for 600 epochs. That takes several Kaggle
# sessions: each one stops and checkpoints before `max_minutes` (11.5 hours, inside Kaggle's 12), and the next
# one continues from that checkpoint, exactly where it stopped.
#
# **The plan on Kaggle** (`vaehelpers kaggle push` sets up the first three for you):
#
# 1. **Attach** the datasets `adityajn105/flickr8k` (the images) and `<you>/vaehelpers-src` (this package, uploaded
#    by `vaehelpers kaggle push`); from the second session on, also this notebook's own output (the version that
#    holds the checkpoint: Input, "+ Add Input" > "Your Work" > "Notebooks").
# 2. **Accelerator: GPU T4 x2** (Settings > Accelerator). GPUs and the internet need a phone-verified Kaggle
#    account (Settings > Phone verification).
# 3. **Run it as a committed version: Save Version > Save & Run All (Commit).** Only a committed version keeps its
#    `/kaggle/working` as output for the next session; an interactive session loses it when it ends, and stops
#    after a while idle.
# 4. **How long:** Step 3 measures this GPU's speed and prints how many sessions and weeks of Kaggle's 30-hour
#    weekly GPU quota the run needs; each later session prints where the run stands (epoch, steps, hours left).
#
# If training fails (out of memory, too many non-finite steps, a process dying), the session still ends cleanly:
# the last good checkpoint stays in the output and the failure is the notebook's last output.

# %% tags=["parameters"]
# Parameters (papermill: -p NAME VALUE). None means the default for the scale: the reference run
# (flickr8k, the sd model, 128 px, 600 epochs), or toy scale when smoke is True.
data_source = None   # "flickr8k" (attached Kaggle input, else the kaggle API), "folder" (your images, data_dir) or "synthetic"
data_dir = None      # the image folder; None: <workspace>/data/<data_source> (workspace: /kaggle/working, or the repository)
run_dir = None       # the training run; None: <workspace>/runs/<data_source>-<preset>-<image_size>
figures_dir = None   # where this notebook saves its PNGs; None: <run_dir>/figures
image_size = None    # square side in pixels, a multiple of 8; None: 128 (smoke: 64)
preset = None        # "sd" (Stable Diffusion's KL-f8, 83.7 M parameters), "small" or "tiny"; None: sd (smoke: tiny)
recipe = None        # "ldm" (the SD VAE's own loss: L1 + LPIPS + KL + PatchGAN; needs the VGG16 weights), "pixel" (L1 + KL, no pretrained file) or "seed"; None: ldm (smoke: pixel)
epochs = None        # None: 600, the reference run (smoke: 50, cut short by max_minutes)
device = None        # "auto", "cpu", "cuda" or "cuda:N"; None: auto (smoke: cpu)
smoke = False        # True: a quick check at toy scale (synthetic images, tiny model, 64 px, minutes on a CPU)
max_minutes = None   # checkpoint and stop before this many minutes of training; None: 690 (11.5 h) (smoke: 2)
max_steps = None     # stop after this many optimiser steps; None: no limit
batch_size = None    # None: the recipe's (16) (smoke: 8)
lr = None            # None: the recipe's (ldm: 4.5e-6 x batch size; pixel: 2e-3; seed: 1e-3) (smoke: 1e-3)
perceptual_weight = None  # None: the recipe's (ldm 1.0, pixel 0, seed 0.1); > 0 needs the VGG16 weights
plot_every = 100     # redraw the live loss plot (or print a line) every this many logged steps
interactive = True   # False (papermill): progress lines instead of a progress bar and a live plot
gpus = None          # training processes; None: one per visible GPU (Kaggle T4 x2: 2); 1: this kernel only
allow_cpu = False    # True: run the full-scale training even on a CPU (days); otherwise it is refused there
run_doctor = True    # a one-minute check of this GPU (precision, a few train steps, checkpoint, speed, batch that fits) before training
start_fresh = False  # True: start the run over even though this notebook's own earlier output is attached
vaehelpers_source = None  # without the dataset vaehelpers-src: a pip requirement to install from (internet on)

# %% [markdown]
# ## Step 0: Set up
#
# On Kaggle the package comes from the dataset `vaehelpers-src` (attached by `vaehelpers kaggle push`); without it
# (e.g. after Copy & Edit) this cell says how to attach it, or, with the internet on, installs from
# `vaehelpers_source`. On your machine `pip install -e ".[notebooks]"` has already installed it, and this cell
# does nothing.

# %%
# Install vaehelpers, keeping Kaggle's own torch: from the attached dataset vaehelpers-src, else (internet on)
# from vaehelpers_source, a pip requirement such as "git+https://github.com/OWNER/vaehelpers".
import glob, importlib.metadata, importlib.util, runpy, subprocess, sys
if importlib.util.find_spec("vaehelpers") is None:
    installers = glob.glob("/kaggle/input/**/vaehelpers_install.py", recursive=True)
    if installers:  # the wheel and its installer, from `vaehelpers kaggle push`
        runpy.run_path(installers[0], run_name="__main__")
    elif vaehelpers_source:
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "torchvision")]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", vaehelpers_source, *pins], check=True)
    else:
        raise ModuleNotFoundError(
            "vaehelpers is not installed and the dataset vaehelpers-src is not attached. Either attach it (right-hand "
            "panel, Input: '+ Add Input' > 'Your Work' > 'Datasets' > vaehelpers-src, uploaded by `vaehelpers kaggle "
            "push`), or turn the internet on (Settings > Internet) and set vaehelpers_source = 'git+https://github.com/"
            "OWNER/vaehelpers' (the repository) in the parameters cell. Then run this cell again.")

# %% [markdown]
# Imports, and the settings.

# %%
# %matplotlib inline
import torch
from IPython.display import Image, display
from vaehelpers import doctor, kaggle, notebook, sessions, viz, widgets
from vaehelpers.config import to_dict

# %% [markdown]
# The parameters above, with every None filled in for the scale chosen; everything below reads them from here.
# Before any work, it checks that this PyTorch can run on the GPU. A full-scale run on a CPU (the accelerator
# off) is refused here, before any work, unless `allow_cpu=True`.

# %%
settings = notebook.setup(
    smoke, data_source=data_source, data_dir=data_dir, run_dir=run_dir, figures_dir=figures_dir,
    image_size=image_size, preset=preset, recipe=recipe, epochs=epochs, device=device, max_minutes=max_minutes, max_steps=max_steps, batch_size=batch_size, lr=lr, perceptual_weight=perceptual_weight,
    check_gpu=True)
device = settings.torch_device
print(notebook.check_scale_fits_device(settings, device, allow_cpu))

# %% [markdown]
# ## Step 1: The run's settings
#
# Preset, then recipe, then the parameters above: every setting of the run, saved as `config.json` in the run
# directory and inside every checkpoint. Resuming with different settings is refused, naming them, because it
# would not be the same run (time limits, device and data location may change).

# %%
cfg = settings.train_config()
to_dict(cfg)

# %% [markdown]
# ## Step 1b: The pretrained weights
#
# The `ldm` recipe's perceptual term (LPIPS) stands on torchvision's ImageNet VGG16 (`vgg16-397923af.pth`,
# 528 MB). With internet on this fetches it once into the torch hub cache; offline, attach a dataset holding it
# and set `os.environ["VAEHELPERS_WEIGHTS"]` to its folder first. Without it the run stops here with one line
# saying what to do; `recipe="pixel"` needs no file.

# %%
from vaehelpers import pretrained
from vaehelpers.train import check_pretrained
with notebook.parameter_errors():  # a missing file is named with the parameter that avoids it
    check_pretrained(cfg, download=True)
print(pretrained.format_status(pretrained.status(cfg.weights_dir or None)))

# %% [markdown]
# ## Step 2: Pick up an earlier session
#
# On Kaggle each session starts with an empty `/kaggle/working`. To continue a run, this notebook's own output
# must be an input: its run directory (and the image cache it built) is copied back here and training resumes
# from its checkpoint. `vaehelpers kaggle push` attaches the newest version whose output holds a checkpoint;
# in the editor, add it yourself (the cell below prints which buttons when nothing is attached). When this
# notebook's output is attached but holds no checkpoint of this run, it stops rather than start over, unless
# `start_fresh=True`. On your machine the run directory simply stays where it is. Then: where the run stands.

# %%
print(kaggle.restore_run(settings.run_dir, start_fresh=start_fresh))
print(sessions.standing(settings.run_dir / "log.csv", cfg.epochs, sessions.train_images(cfg.data.data_dir), cfg.max_minutes))

# %% [markdown]
# ## Step 3: Train
#
# Before hours of training, a one-minute check of this machine: the precision `auto` picks and why, a few real
# train steps, a checkpoint written and resumed, speed, and the largest batch that fits; from its speed, how many
# sessions and weeks of GPU quota the run needs. (`run_doctor=False` skips it; at smoke scale it is skipped too.)

# %%
if run_doctor and not settings.smoke:
    processes = gpus or max(1, torch.cuda.device_count())  # doctor checks one process's share of the batch
    report = doctor.run(device=cfg.device, preset=cfg.preset, image_size=cfg.data.image_size, batch_size=max(1, cfg.batch_size // processes), precision=cfg.precision)
    with notebook.parameter_errors(): report.raise_for_failure()
    print(sessions.plan(sessions.train_images(cfg.data.data_dir), cfg.epochs, sessions.doctor_images_per_s(report, processes), cfg.max_minutes))

# %% [markdown]
# Training resumes from `checkpoints/last.pt` when it exists, logs every step to `log.csv` and TensorBoard, and
# calls back with each row: here a live loss plot, redrawn in place every `plot_every` steps (printed lines
# under papermill). `launch` runs one process per visible GPU (data-parallel, as `torchrun` would; on one GPU
# or the CPU it simply trains here). It returns how it ended: finished, stopped for the time limit or a signal,
# or failed: then the failure is shown and printed again as this notebook's last output, and the session ends
# cleanly, because Kaggle keeps no output of a version that errored.

# %%
live_plot = widgets.LiveLossPlot(every=plot_every, interactive=interactive)
result = sessions.guarded_launch(cfg, gpus, resume=True, progress=interactive, on_log=live_plot)
result

# %% [markdown]
# ## Step 4: The loss curve of the whole run
#
# From `log.csv`, so it covers earlier sessions too: positive terms on a log scale, smoothed over the faint raw
# values. Saved as `loss_curve.png`.

# %%
if (settings.run_dir / "log.csv").is_file():  # absent only when the first session failed before its first step
    fig = viz.loss_curve_figure(settings.run_dir / "log.csv", smooth=max(1, plot_every // 4))
    viz.save_figure(fig, settings.figures_dir / "loss_curve.png")
    display(fig)

# %% [markdown]
# ## Step 5: How it reconstructs now
#
# At every checkpoint, and at the end, training draws the same few held-out images and their reconstructions
# (posterior mean), with the error map; this is the last one.

# %%
if (settings.run_dir / "figures" / "reconstructions.png").is_file():
    display(Image(filename=str(settings.run_dir / "figures" / "reconstructions.png")))

# %% [markdown]
# ## Step 6: How this session ended
#
# The last word of the session: how training ended, or, if it failed, why (the checkpoint it left stays in the
# output for the next session).

# %%
print(result)

# %% [markdown]
# ## Several GPUs, and the command line
#
# This notebook trains with one process per visible GPU (`gpus`; two on a Kaggle T4 x2), the live plot fed by
# process 0. The same run from a terminal or a `!` cell with torchrun:
#
# ```
# torchrun --standalone --nproc_per_node 2 -m vaehelpers train --data DATA --run-dir RUN --preset sd --image-size 128 --epochs 600 --max-minutes 690 --resume
# ```
#
# ## Now it's your turn
#
# - Run the next session (`vaehelpers kaggle push --only 04`, or Save & Run All with this output attached): it
#   resumes from the checkpoint instead of starting over.
# - Watch the held-out PSNR in TensorBoard: `tensorboard --logdir <run_dir>/tensorboard`.
# - Try `recipe="pixel"` (no pretrained file: a CPU, an offline kernel), `recipe="seed"`, or `preset="small"` on a CPU.
# - Next: **05_evaluation** measures the run on the held-out images and lets you explore its latents.

