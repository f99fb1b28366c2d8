"""Write the five notebooks from the text below, without outputs: `python notebooks/build.py`.

The notebooks are generated so that their shared opening (parameters, the Kaggle install, the settings) stays
the same in all five and the committed files never carry outputs or execution counts. Edit here, then run.
"""
from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- shared cells

COMMON_PARAMETERS = '''\
# Parameters (papermill: -p NAME VALUE). None means the default for the scale: the reference run
# (flickr8k, the sd model, 128 px, 600 epochs), or toy scale when smoke is True.
data_source = None   # "flickr8k" (attached Kaggle input, else the kaggle API), "folder" (your images, data_dir) or "synthetic"
data_dir = None      # the image folder; None: <workspace>/data/<data_source> (workspace: /kaggle/working, or the repository)
run_dir = None       # the training run; None: <workspace>/runs/<data_source>-<preset>-<image_size>
figures_dir = None   # where this notebook saves its PNGs; None: <run_dir>/figures
image_size = None    # square side in pixels, a multiple of 8; None: 128 (smoke: 64)
preset = None        # "sd" (Stable Diffusion's KL-f8, 83.7 M parameters), "small" or "tiny"; None: sd (smoke: tiny)
recipe = None        # "default" or "seed" (the original project's loss; needs VGG16 weights); None: default
epochs = None        # None: 600, the reference run (smoke: 50, cut short by max_minutes)
device = None        # "auto", "cpu", "cuda" or "cuda:N"; None: auto (smoke: cpu)
smoke = False        # True: a quick check at toy scale (synthetic images, tiny model, 64 px, minutes on a CPU)'''

INSTALL = '''\
# On Kaggle: install vaehelpers from the attached dataset vaehelpers-src; Kaggle's own torch is kept.
import glob, importlib.util, runpy
if importlib.util.find_spec("vaehelpers") is None:
    installers = glob.glob("/kaggle/input/**/vaehelpers_install.py", recursive=True)
    runpy.run_path(installers[0], run_name="__main__")  # IndexError: attach vaehelpers-src, or `pip install -e .`'''

INSTALL_MD = '''\
## Step 0: Set up

On Kaggle the package comes from the dataset `vaehelpers-src` (attached by `vaehelpers kaggle push`); on your
machine `pip install -e ".[notebooks]"` has already installed it, and this cell does nothing.'''


def settings_cell(extra: str = "") -> str:
    extra = f", {extra}" if extra else ""
    return f'''\
settings = notebook_settings(
    smoke, data_source=data_source, data_dir=data_dir, run_dir=run_dir, figures_dir=figures_dir,
    image_size=image_size, preset=preset, recipe=recipe, epochs=epochs, device=device{extra})
print(settings)'''


SETTINGS_MD = "The parameters above, with every None filled in for the scale chosen; everything below reads them from here."

GPU_MD = '''\
Before any work, check that this PyTorch can run on the GPU. Kaggle's default PyTorch has no kernels for the
P100 (sm_60): on one, this stops with what to do, or, with `install_legacy_torch=True` and internet on,
installs PyTorch 2.5.1 (which still has them) and asks you to restart the kernel.'''

GPU = '''\
print(kaggle.ensure_gpu_supported(install_legacy_torch))
device = resolve_device(settings.device)
device'''


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text)


def code(text: str, *tags: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(text)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def parameters(extra: str = "") -> nbformat.NotebookNode:
    return code(COMMON_PARAMETERS + (f"\n{extra}" if extra else ""), "parameters")


def setup_cells(imports: str, settings_extra: str = "", gpu_check: bool = True,
                imports_md: str = "Imports, and the settings.") -> list:
    """The cells every notebook opens with, after its parameters: install, imports, settings, the GPU check."""
    cells = [md(INSTALL_MD), code(INSTALL), md(imports_md), code(imports), md(SETTINGS_MD),
             code(settings_cell(settings_extra))]
    return cells + [md(GPU_MD), code(GPU)] if gpu_check else cells


# --------------------------------------------------------------------------- 01 data

DATA = [
    md('''\
# 01 · Data: the images the autoencoder learns from

An autoencoder learns to squeeze images through a small latent and back, so everything it learns comes from
its images. The reference run uses **flickr8k**: 8,091 everyday photos (people, dogs, streets) of varied size.
This notebook fetches them, splits them into training and held-out images, reports any file that cannot be
used, builds a cache of decoded images for fast epochs, and shows what the model will see.

Run it on Kaggle with flickr8k attached, on your machine with any folder of images, or with `smoke=True` on
procedural images (no download at all).'''),
    parameters('synthetic_count = None   # images made when data_source is "synthetic"; None: 256 (smoke: 128)'),
    *setup_cells(
        '''\
%matplotlib inline
import torch
from vaehelpers import data, viz
from vaehelpers.demo import notebook_settings''',
        "synthetic_count=synthetic_count",
        gpu_check=False,
        imports_md="The notebooks call the package for all real work, so the same code runs here, in the tests and on the command line."),
    md('''\
## Step 1: Get the images

Where the images come from depends on `data_source`:

- **flickr8k**: an attached Kaggle input (Add Input, search `adityajn105/flickr8k`) is used where it is;
  otherwise the kaggle API downloads it once into `data_dir` (it needs your API token, see the error message).
- **folder**: every image under `data_dir`, recursively, in any common format.
- **synthetic**: procedural pictures (shapes on textures), made here in a second; the embedded default of the demo.'''),
    code('''\
images_dir = settings.image_folder()
files = data.list_images(images_dir)
print(f"{len(files)} image files in {images_dir}")'''),
    md('''\
## Step 2: Split, and build the cache

A stable hash of each file's path puts about 10% of the files in the held-out `test` split, so the same file
always lands on the same side whatever else is in the folder, and training never sees a test image. Building
a dataset decodes every image once, resizes its shorter side to `image_size` and keeps the pixels as uint8 in
one cache file; later epochs, and the other notebooks, read the cache instead of decoding JPEGs again.'''),
    code('''\
train_set = settings.dataset("train")
test_set = settings.dataset("test")
print(train_set)
print(test_set)'''),
    md('''\
## Step 3: Files that cannot be used

A file that is empty, truncated, not an image, tiny, or a decompression bomb is reported once, with its path
and the reason, and left out; it never stops a run halfway through an epoch. A clean dataset shows 0 skipped.'''),
    code('''\
print(train_set.report.summary())
print(test_set.report.summary())'''),
    md('''\
## Step 4: Look at the images

A grid of training images as the model receives them for evaluation: shorter side resized to `image_size`, then
the centre square. The figure is saved as `sample_grid.png` in the figures folder.'''),
    code('''\
samples = torch.stack([train_set[i] for i in range(min(16, len(train_set)))])
fig = viz.image_grid(samples, nrow=8, title=f"{len(train_set)} training images, {settings.image_size} px")
viz.save_figure(fig, settings.figures_dir / "sample_grid.png")
fig'''),
    md('''\
During training each epoch sees a different random square of each image, sometimes mirrored (augmentation),
so the model cannot memorise exact pixels. Here is one image over four epochs.'''),
    code('''\
augmented, views = settings.dataset("train", augment=True), []
for epoch in range(4):
    augmented.set_epoch(epoch)
    views.append(augmented[0])
viz.image_grid(views, nrow=4, titles=[f"epoch {epoch}" for epoch in range(4)])'''),
    md('''\
## Step 5: What the model receives

Images go into the model as float tensors of shape (3, S, S) with values in [-1, 1]: the range Stable
Diffusion's autoencoder uses. Metrics later map back to [0, 1] pixels.'''),
    code('''\
print(f"one batch: {tuple(samples.shape)}, values in [{samples.min():.2f}, {samples.max():.2f}]")'''),
    md('''\
## Now it's your turn

- Point `data_source="folder"` and `data_dir` at your own photos and run this notebook again.
- Try a larger `image_size` (256): the cache grows with its square, the model's cost too.
- Next: **02_architecture** shows the model these images go through.'''),
]

# --------------------------------------------------------------------------- 02 architecture

ARCHITECTURE = [
    md('''\
# 02 · Architecture: Stable Diffusion's KL autoencoder

The model is the KL-f8 autoencoder of Stable Diffusion: an encoder of ResNet blocks (GroupNorm, SiLU) that
halves the resolution three times, a self-attention block in the middle, and a decoder that mirrors it. It
maps a 128x128 image to a 4x16x16 latent, 48 times fewer numbers. This notebook builds it, counts its
parameters part by part, and follows a batch through it.'''),
    parameters(),
    *setup_cells(
        '''\
%matplotlib inline
import torch
from vaehelpers import viz
from vaehelpers.config import MODEL_PRESETS
from vaehelpers.demo import notebook_settings
from vaehelpers.model import AutoencoderKL, parameter_table, trace_shapes''',
        gpu_check=False),
    md('''\
## Step 1: Build the model

A preset names a `ModelConfig`: `sd` is Stable Diffusion's (base width 128, multipliers 1, 2, 4, 4), `small`
and `tiny` are narrower versions of the same design for CPUs and tests.'''),
    code('''\
model = AutoencoderKL.from_preset(settings.preset).eval()
model.config'''),
    md('''\
## Step 2: Where the parameters are

Most of the weights sit in the widest levels; the decoder is larger than the encoder (one more ResNet block per
level, as in SD), because turning a small latent back into detail is the harder half of the job.'''),
    code('''\
for part, count in parameter_table(model):
    print(f"{part:<42}{count:>14,}")'''),
    md('''\
## Step 3: Tensor shapes, from pixels to latents and back

One held-out image goes through; each encoder level halves the side, the moments hold a mean and a
log-variance per latent channel (hence 8 channels for 4 latents), and the decoder doubles its way back.'''),
    code('''\
images = settings.dataset("test")[0][None]  # (1, 3, S, S) in [-1, 1]
for part, shape in trace_shapes(model, images):
    print(f"{part:<28}{str(shape):>22}")'''),
    md('''\
## Step 4: The latent

`encode` returns a posterior: a Gaussian per latent value. Training decodes a sample of it; evaluation decodes
its mean (`mode()`). `kl()` measures, per image, how far the posterior is from N(0, I): the term that keeps the
latent space smooth enough to sample from and to train a diffusion model on.'''),
    code('''\
with torch.no_grad():
    posterior = model.encode(images)
latents = posterior.sample(generator=torch.Generator().manual_seed(0))
print(f"latents {tuple(latents.shape)}: {latents[0].numel():,} numbers for {images[0].numel():,} pixel values "
      f"({images[0].numel() / latents[0].numel():.0f}x fewer); KL per image {posterior.kl().item():.1f}")'''),
    md("An untrained model's latents are noise, and so is its reconstruction: this is where training starts."),
    code('''\
with torch.no_grad():
    reconstructions = model.decode(posterior.mode())
viz.reconstruction_figure(images, reconstructions, titles=["untrained"])'''),
    md('''\
## Step 5: Weights that move to and from diffusers

Module and parameter names are exactly those of diffusers' `AutoencoderKL`, so a state dict loads in either
direction with `strict=True`, and `vaehelpers convert RUN DEST --to diffusers` writes a folder that
`diffusers.AutoencoderKL.from_pretrained(DEST)` opens (`--to ldm` writes the original SD checkpoint layout).
The first few keys:'''),
    code('''\
list(model.state_dict())[:8]'''),
    md('''\
## Step 6: The presets side by side

Built on the `meta` device, which allocates no memory, so even `sd` costs nothing to count.'''),
    code('''\
for name in MODEL_PRESETS:
    with torch.device("meta"):
        print(f"{name:<6}{parameter_table(AutoencoderKL.from_preset(name))[-1][1]:>14,} parameters")'''),
    md('''\
## Now it's your turn

- `vaehelpers info --preset sd --image-size 256` prints the same tables for any size.
- Change `channel_multipliers` or `latent_channels` in a `ModelConfig` and see what happens to the shapes.
- Next: **03_loss**, what the model is trained to minimise.'''),
]

# --------------------------------------------------------------------------- 03 loss

LOSS = [
    md('''\
# 03 · Loss: what training minimises

The loss has up to four terms: a **reconstruction** error in pixels, an optional **perceptual** error in the
features of a pretrained VGG16 (LPIPS), a **KL** term that keeps the latents close to N(0, I), and an optional
**PatchGAN** term that rewards realistic texture. This notebook computes each one on a real batch, plots how
their weights change over training, and shows what the perceptual term looks at.'''),
    parameters('install_legacy_torch = False  # P100 with Kaggle\'s default PyTorch: install torch 2.5.1 (sm_60), then restart'),
    *setup_cells(
        '''\
%matplotlib inline
import torch
from vaehelpers import kaggle, viz
from vaehelpers.config import build_config
from vaehelpers.demo import notebook_settings
from vaehelpers.losses import VAELoss, kl_loss, reconstruction_loss
from vaehelpers.model import AutoencoderKL
from vaehelpers.runtime import resolve_device'''),
    md('''\
## Step 1: A real batch, and an untrained model's reconstructions

Four training images, and what a freshly initialised model makes of them, decoded from a posterior sample as
in training. Every term is large here: this is where training starts.'''),
    code('''\
train_set = settings.dataset("train")
images = torch.stack([train_set[i] for i in range(4)]).to(device)
model = AutoencoderKL.from_preset(settings.preset).to(device).eval()
with torch.no_grad():
    reconstructions, posterior = model(images, sample_posterior=True, generator=torch.Generator(device).manual_seed(0))'''),
    md("The first two, with their error maps:"),
    code('''\
viz.reconstruction_figure(images[:2], reconstructions[:2])'''),
    md('''\
## Step 2: The loss as training computes it

`VAELoss` is configured by the run's `LossConfig` (the recipe's weights) and returns the total and a dict of
logs, the same values training writes to `log.csv` and TensorBoard.'''),
    code('''\
cfg = settings.train_config()
loss, logs = VAELoss(cfg.loss).to(device)(images, reconstructions, posterior, step=0, epoch=0.0)
for name, value in logs.items():
    print(f"{name:<24}{value:>14.6g}")'''),
    md('''\
## Step 3: Each term on its own

Three reconstruction errors on the same pair: L1 (the default: sharper than L2, as in LDM), L2, and the binary
cross-entropy on [0, 1] the original project used. Then the KL in its two reductions: `sum` adds up every
latent value per image (LDM's convention, hence its tiny weight of 1e-6), `seed` sums channels and averages
positions (the original project's, with weight 1).'''),
    code('''\
for kind in ("l1", "l2", "bce"):
    print(f"reconstruction {kind:<4}{reconstruction_loss(images, reconstructions, kind).item():>12.5f}")
for reduction in ("sum", "seed"):
    print(f"KL {reduction:<14}{kl_loss(posterior, reduction).item():>12.2f}")'''),
    md('''\
## Step 4: The weights over training

Each recipe weighs the terms differently; the `seed` recipe scales pixels and features by 500 and ramps the
KL weight up over its first 20 epochs, so that the autoencoder learns to reconstruct before it is pulled
towards the prior. The figure is saved as `loss_weights.png`.'''),
    code('''\
recipes = {"default": cfg.loss, "seed": build_config(settings.preset, "seed").loss}
fig = viz.loss_weights_figure(recipes, epochs=settings.epochs)
viz.save_figure(fig, settings.figures_dir / "loss_weights.png")
fig'''),
    md('''\
## Step 5: What the perceptual term sees

LPIPS compares images by the features of a pretrained VGG16 at five depths: early layers see edges and
colour, deep ones textures and parts. Bright areas below are where the reconstruction's features differ
most. It needs the pretrained VGG16 weights (downloaded on Kaggle with internet on); without them the figure
says so, and training works without this term (`perceptual_weight=0`, the default recipe's value).'''),
    code('''\
viz.perceptual_figure(images, reconstructions)'''),
    md('''\
The PatchGAN term (`loss.disc_weight > 0`) is off by default: LDM turns it on only after 50,001 steps, once
reconstructions are good, and weighs it adaptively against the reconstruction gradient at the decoder's last
layer.

## Now it's your turn

- Compare `recipe="seed"` with the default: which terms dominate at epoch 0 and at epoch 20?
- Set `perceptual_weight` in **04_training** (e.g. 0.1) on Kaggle, where the VGG16 weights download.
- Next: **04_training**, putting the loss to work.'''),
]

# --------------------------------------------------------------------------- 04 training

TRAINING = [
    md('''\
# 04 · Training: the reference run

Train the autoencoder on the training split, with the held-out split checked at every checkpoint. The
defaults are the reference run: the `sd` model on flickr8k at 128 px for 600 epochs. That takes longer than
one Kaggle session, so the run **stops and checkpoints before `max_minutes`** (11.5 hours, inside Kaggle's
12) and **resumes by itself** when this notebook runs again with the checkpoint in place, continuing exactly
where it stopped. The stop button (SIGTERM) checkpoints too.'''),
    parameters('''\
max_minutes = None   # checkpoint and stop before this many minutes of training; None: 690 (11.5 h) (smoke: 2)
max_steps = None     # stop after this many optimiser steps; None: no limit
batch_size = None    # None: the recipe's (16) (smoke: 8)
lr = None            # None: the recipe's (2e-3 default, 1e-3 seed) (smoke: 1e-3)
perceptual_weight = None  # None: the recipe's (0 default, 0.1 seed); > 0 needs the VGG16 weights
plot_every = 100     # redraw the live loss plot (or print a line) every this many logged steps
interactive = True   # False (papermill): progress lines instead of a progress bar and a live plot
gpus = None          # training processes: None = one per visible GPU (Kaggle T4x2: 2), 1 = this kernel only
install_legacy_torch = False  # P100 with Kaggle's default PyTorch: install torch 2.5.1 (sm_60), then restart'''),
    *setup_cells(
        '''\
%matplotlib inline
from IPython.display import Image
from vaehelpers import kaggle, viz
from vaehelpers.config import to_dict
from vaehelpers.demo import notebook_settings
from vaehelpers.distributed import launch
from vaehelpers.runtime import resolve_device''',
        "max_minutes=max_minutes, max_steps=max_steps, batch_size=batch_size, lr=lr, "
        "perceptual_weight=perceptual_weight"),
    md('''\
## Step 1: The run's settings

Preset, then recipe, then the parameters above: every setting of the run, saved as `config.json` in the run
directory and inside every checkpoint. Resuming with different settings is refused, naming them, because it
would not be the same run (time limits, device and data location may change).'''),
    code('''\
cfg = settings.train_config()
to_dict(cfg)'''),
    md('''\
## Step 2: Pick up an earlier session

On Kaggle each session starts with an empty `/kaggle/working`. To continue a run, add this notebook's own
output as an input (Add Input > Your Work) before running: its run directory is copied back here and
training resumes from its checkpoint. On your machine the run directory simply stays where it is.'''),
    code('''\
print(kaggle.restore_run(settings.run_dir))'''),
    md('''\
## Step 3: Train

Training resumes from `checkpoints/last.pt` when it exists, logs every step to `log.csv` and TensorBoard, and
calls back with each row: here a live loss plot, redrawn in place every `plot_every` steps (printed lines
under papermill). `launch` runs one process per visible GPU (data-parallel, as `torchrun` would; on one GPU
or the CPU it simply trains here). It returns how it ended: finished, or stopped for the time limit or a signal.'''),
    code('''\
live_plot = viz.LiveLossPlot(every=plot_every, interactive=interactive)
result = launch(cfg, gpus, resume=True, progress=interactive, on_log=live_plot)
result'''),
    md('''\
## Step 4: The loss curve of the whole run

From `log.csv`, so it covers earlier sessions too: positive terms on a log scale, smoothed over the faint raw
values. Saved as `loss_curve.png`.'''),
    code('''\
fig = viz.loss_curve_figure(settings.run_dir / "log.csv", smooth=max(1, plot_every // 4))
viz.save_figure(fig, settings.figures_dir / "loss_curve.png")
fig'''),
    md('''\
## Step 5: How it reconstructs now

At every checkpoint, and at the end, training draws the same few held-out images and their reconstructions
(posterior mean), with the error map; this is the last one.'''),
    code('''\
Image(filename=str(settings.run_dir / "figures" / "reconstructions.png"))'''),
    md('''\
## Several GPUs, and the command line

This notebook trains on one GPU. On a Kaggle T4 x2, or any multi-GPU machine, the same run goes faster from a
terminal or a `!` cell with torchrun (one process per GPU; the batch is split between them):

```
torchrun --nproc_per_node 2 -m vaehelpers train --data DATA --run RUN --preset sd --image-size 128 --epochs 600 --max-minutes 690 --resume
```

## Now it's your turn

- Run this notebook again: it resumes from the checkpoint instead of starting over.
- Watch the held-out PSNR in TensorBoard: `tensorboard --logdir <run_dir>/tensorboard`.
- Try `recipe="seed"` (on Kaggle, for the VGG16 weights) or `preset="small"` on a CPU.
- Next: **05_evaluation** measures the run on the held-out images and lets you explore its latents.'''),
]

# --------------------------------------------------------------------------- 05 evaluation

EVALUATION = [
    md('''\
# 05 · Evaluation: how good are the reconstructions, and what is in the latents?

Numbers first: MAE, MSE and PSNR on pixels in [0, 1], SSIM and (where its weights load) LPIPS, on the
held-out split that training never saw. Then pictures: reconstructions with their error, any image of yours,
the four latent channels, a walk between two images in latent space, samples from the prior, and sliders to
edit latents and watch the decoder respond.'''),
    parameters('''\
image_path = None    # any image file to reconstruct, of any size; None: the first held-out image
n_show = 6           # held-out images in the figures and the explorer
interactive = True   # False (papermill, `make demo`): static figures in place of the widgets
install_legacy_torch = False  # P100 with Kaggle's default PyTorch: install torch 2.5.1 (sm_60), then restart'''),
    *setup_cells(
        '''\
%matplotlib inline
import torch
from IPython.display import Image
from vaehelpers import kaggle, metrics, viz
from vaehelpers.demo import notebook_settings
from vaehelpers.model import AutoencoderKL
from vaehelpers.reconstruct import format_rows, reconstruct_files
from vaehelpers.runtime import resolve_device'''),
    md('''\
## Step 1: Load the trained model

From the run directory of **04_training** (`model.safetensors`, the final or EMA weights). On Kaggle, attach
that notebook's output as an input; it is copied here first.'''),
    code('''\
print(kaggle.restore_run(settings.run_dir))
model = AutoencoderKL.load(settings.run_dir).to(device).eval()
print(f"{sum(p.numel() for p in model.parameters()):,} parameters, scaling_factor {model.config.scaling_factor}")'''),
    md('''\
## Step 2: Metrics on the held-out split

Every held-out image, preprocessed like evaluation everywhere (shorter side to `image_size`, centre crop),
reconstructed from the posterior mean. PSNR is the mean of per-image values. The numbers are also written to
`evaluation.json` in the run directory.'''),
    code('''\
test_set = settings.dataset("test")
summary = metrics.evaluate(model, test_set, progress=interactive)
metrics.write_json(summary, settings.run_dir / "evaluation.json")
print(metrics.format_table(summary))'''),
    md('''\
## Step 3: Original, reconstruction, error

The error map is the mean absolute error over channels on [0, 1]: fine texture and small text are what an
8x-downsampling autoencoder loses first. Saved as `reconstructions.png`.'''),
    code('''\
images = torch.stack([test_set[i] for i in range(min(n_show, len(test_set)))])
reconstructions = viz.decode(model, viz.encode(model, images))
fig = viz.reconstruction_figure(images, reconstructions, titles=[test_set.get_path(i).name for i in range(len(images))])
viz.save_figure(fig, settings.figures_dir / "reconstructions.png")
fig'''),
    md('''\
## Step 4: Your own image

Any file, at its own size: it is padded to a multiple of 8 for the model and the reconstruction cropped back.
Set `image_path` to try one of yours.'''),
    code('''\
rows = reconstruct_files(model, [image_path or test_set.get_path(0)], settings.figures_dir / "custom", device=device)
print(format_rows(rows))
Image(filename=rows[0]["reconstruction_png"])'''),
    md('''\
## Step 5: The four latent channels

Each image becomes 4 channels at 1/8 of its side. Pictured on a diverging scale around 0, they still look like
the image: the KL-f8 latent is a compressed picture, not an abstract code. Saved as `latent_channels.png`.'''),
    code('''\
fig = viz.latent_channels_figure(viz.encode(model, images[:2]), titles=["image 0", "image 1"])
viz.save_figure(fig, settings.figures_dir / "latent_channels.png")
fig'''),
    md('''\
## Step 6: Between two images

Decode the straight line from one image's latents to another's. Midway is a cross-fade of the two, not a new
object: the latent space of an autoencoder is smooth, but it is not semantic. Saved as `interpolation.png`.'''),
    code('''\
fig = viz.interpolation_figure(viz.interpolate(model, images[0], images[1]))
viz.save_figure(fig, settings.figures_dir / "interpolation.png")
fig'''),
    md('''\
## Step 7: Samples from the prior

Latents drawn from N(0, I), divided by the scaling factor (real latents have a std of about 1/scaling_factor),
then decoded. Expect colourful texture rather than scenes: with a KL weight of 1e-6 the latents are far from
N(0, I), which is why Stable Diffusion trains a diffusion model to produce them. (`vaehelpers scale` measures
this run's own scaling factor.) Saved as `prior_samples.png`.'''),
    code('''\
samples = viz.prior_samples(model, 8, settings.image_size, generator=torch.Generator().manual_seed(0))
fig = viz.prior_samples_figure(samples)
viz.save_figure(fig, settings.figures_dir / "prior_samples.png")
fig'''),
    md('''\
## Step 8: Edit the latents

Pick an image, then move each channel's offset (in units of that channel's typical deviation) or scale, and
the decoder redraws at once. Under papermill (`interactive=False`) the static stand-in shows each channel
moved by -2, 0 and +2 deviations.'''),
    code('''\
explorer = viz.LatentExplorer(model, images)
explorer if interactive else explorer.channel_figure()'''),
    md("And a slider that walks between the first two images."),
    code('''\
walk = viz.InterpolationExplorer(model, images[0], images[1])
walk if interactive else walk.figure()'''),
    md('''\
## Now it's your turn

- Evaluate on a different folder: `vaehelpers evaluate --run RUN --data DIR --split all`.
- Compare runs: a `small` model, the `seed` recipe, a perceptual weight, a longer run.
- Export the weights for diffusers: `vaehelpers convert RUN out/ --to diffusers`.'''),
]

NOTEBOOKS = {
    "01_data": DATA,
    "02_architecture": ARCHITECTURE,
    "03_loss": LOSS,
    "04_training": TRAINING,
    "05_evaluation": EVALUATION,
}


def build(name: str, cells: list) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = cells
    notebook.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"{name[:2]}-{index:02d}"  # stable ids: regenerating changes nothing that did not change
    nbformat.validate(notebook)
    return notebook


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), HERE / f"{name}.ipynb")
        print(f"wrote {HERE / f'{name}.ipynb'}")


if __name__ == "__main__":
    main()
