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
# # 05 · Evaluation: how good are the reconstructions, and what is in the latents?
#
# Numbers first: MAE, MSE and PSNR on pixels in [0, 1], SSIM and (where their weights load) LPIPS and rFID, on
# the held-out split that training never saw. Then pictures: reconstructions with their error, any image of yours,
# the four latent channels, a walk between two images in latent space, samples from the prior, and sliders to
# edit latents and watch the decoder respond. Last, optionally, this run side by side with another VAE.

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
image_path = None    # any image file to reconstruct, of any size; None: the first held-out image
n_show = 6           # held-out images in the figures and the explorer
compare_with = None   # a second VAE to compare with this run on the held-out images, e.g. "/kaggle/input/datasets/<owner>/sd-vae-ft-mse"; None: skipped
interactive = True   # False (papermill, `make demo`): static figures in place of the widgets
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
from IPython.display import Image
from vaehelpers import compare, kaggle, latents, metrics, notebook, viz, widgets
from vaehelpers.model import AutoencoderKL
from vaehelpers.reconstruct import format_rows, reconstruct_files

# %% [markdown]
# The parameters above, with every None filled in for the scale chosen; everything below reads them from here.
# Before any work, it checks that this PyTorch can run on the GPU (on Kaggle: GPU T4 x2).

# %%
settings = notebook.setup(
    smoke, data_source=data_source, data_dir=data_dir, run_dir=run_dir, figures_dir=figures_dir,
    image_size=image_size, preset=preset, recipe=recipe, epochs=epochs, device=device,
    check_gpu=True)
device = settings.torch_device

# %% [markdown]
# ## Step 1: Load the trained model
#
# From the run directory of **04_training** (`model.safetensors`, the final or EMA weights). On Kaggle, attach
# that notebook's output as an input (this cell says how when none is found); it is copied here first.

# %%
print(kaggle.require_run(settings.run_dir))
model = AutoencoderKL.load(settings.run_dir).to(device).eval()
print(f"{sum(p.numel() for p in model.parameters()):,} parameters, scaling_factor {model.config.scaling_factor}")

# %% [markdown]
# ## Step 2: Metrics on the held-out split
#
# Every held-out image, preprocessed like evaluation everywhere (shorter side to `image_size`, centre crop),
# reconstructed from the posterior mean. PSNR is the mean of per-image values. The numbers are also written to
# `evaluation.json` in the run directory.
# At full scale LPIPS's pretrained VGG16 is fetched first (once, into the torch hub cache); at smoke scale nothing
# is downloaded and LPIPS reads n/a.

# %%
test_set = settings.dataset("test")
settings.fetch_pretrained("vgg16", "lpips")  # LPIPS; at smoke scale nothing is downloaded
summary = metrics.evaluate(model, test_set, progress=interactive)
metrics.write_json(summary, settings.run_dir / "evaluation.json")
print(metrics.format_table(summary))

# %% [markdown]
# ## Step 3: Original, reconstruction, error
#
# The error map is the mean absolute error over channels on [0, 1]: fine texture and small text are what an
# 8x-downsampling autoencoder loses first. Saved as `reconstructions.png`.

# %%
images = torch.stack([test_set[i] for i in range(min(n_show, len(test_set)))])
reconstructions = latents.reconstruct(model, images)
fig = viz.reconstruction_figure(images, reconstructions, titles=[test_set.get_path(i).name for i in range(len(images))])
viz.save_figure(fig, settings.figures_dir / "reconstructions.png")
fig

# %% [markdown]
# ## Step 4: Your own image
#
# Any file, at its own size: it is padded to a multiple of 8 for the model and the reconstruction cropped back.
# Set `image_path` to try one of yours. A phone photo (12 MP) does not fit through the `sd` model at once, so
# `tile="auto"` splits it into overlapping tiles where the free memory is short (the first line says what it
# chose), with each GroupNorm's statistics taken over the whole image: no seams, no tone shift between tiles
# (results/tiling.md). `tile=512` forces tiles of 512 pixels, `tile="off"` never tiles.

# %%
where = settings.figures_dir / "custom"
rows = reconstruct_files(model, [image_path or test_set.get_path(0)], where, device=device, tile="auto")
print(format_rows(rows))
Image(filename=rows[0]["reconstruction_png"])

# %% [markdown]
# ## Step 5: The four latent channels
#
# Each image becomes 4 channels at 1/8 of its side. Pictured on a diverging scale around 0, they still look like
# the image: the KL-f8 latent is a compressed picture, not an abstract code. Saved as `latent_channels.png`.

# %%
fig = viz.latent_channels_figure(latents.encode(model, images[:2]), titles=["image 0", "image 1"])
viz.save_figure(fig, settings.figures_dir / "latent_channels.png")
fig

# %% [markdown]
# ## Step 6: Between two images
#
# Decode the straight line from one image's latents to another's. Midway is a cross-fade of the two, not a new
# object: the latent space of an autoencoder is smooth, but it is not semantic. Saved as `interpolation.png`.

# %%
fig = viz.interpolation_figure(latents.interpolate(model, images[0], images[1]))
viz.save_figure(fig, settings.figures_dir / "interpolation.png")
fig

# %% [markdown]
# ## Step 7: Samples from the prior
#
# Latents drawn per channel from N(mean, std²) where `vaehelpers scale` measured them, else from N(0, I) divided
# by the scaling factor, then decoded. Expect colourful texture rather than scenes: with a KL weight of 1e-6 the latents are far from
# N(0, I), which is why Stable Diffusion trains a diffusion model to produce them. (`vaehelpers scale` measures
# this run's own scaling factor.) Saved as `prior_samples.png`.

# %%
samples = latents.prior_samples(model, 8, settings.image_size, generator=torch.Generator().manual_seed(0))
fig = viz.prior_samples_figure(samples)
viz.save_figure(fig, settings.figures_dir / "prior_samples.png")
fig

# %% [markdown]
# ## Step 8: Edit the latents
#
# Pick an image, then move each channel's offset (in units of that channel's typical deviation) or scale, and
# the decoder redraws at once. Under papermill (`interactive=False`) the static stand-in shows each channel
# moved by -2, 0 and +2 deviations.

# %%
explorer = widgets.LatentExplorer(model, images)
explorer if interactive else explorer.channel_figure()

# %% [markdown]
# And a slider that walks between the first two images.

# %%
walk = widgets.InterpolationExplorer(model, images[0], images[1])
walk if interactive else walk.figure()

# %% [markdown]
# ## Step 9: Compare with another VAE
#
# Is your VAE better than the released one on your images? On Kaggle, attach the released `sd-vae-ft-mse` (a
# diffusers folder) as a dataset and set `compare_with` to its folder. Both models reconstruct the same held-out
# images at this run's image size. The table gives PSNR, SSIM, LPIPS, rFID, MAE/MSE, each model's latent channels
# with their mean and std, encode+decode speed on this machine and parameters; the figure shows the same images
# reconstructed by each, with per-image PSNR. rFID on a few hundred images is biased upward: compare it between
# these models, not with published tables. Saved under `figures/compare/`.
#
# To attach it: in the Kaggle editor, *Add Input* → search for `sd-vae-ft-mse` → pick a dataset that holds the
# diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`), then copy its path from the input
# panel into `compare_with`. With internet on, the Hub id `"stabilityai/sd-vae-ft-mse"` works as well.

# %%
result = compare.compare_in_notebook(compare_with, settings.run_dir, test_set.root, settings.figures_dir / "compare",
                                     image_size=settings.image_size, device=device,
                                     cache_dir=settings.cache_dir(test_set.root), progress=interactive)
Image(filename=result["files"]["figure"]) if result else None

# %% [markdown]
# ## Now it's your turn
#
# - Evaluate on a different folder, or any VAE (a run, a diffusers folder, an LDM/SD `.safetensors`, a Hub id):
#   `vaehelpers evaluate --model RUN_OR_ANY_VAE --data DIR --split all`.
# - Compare your run with other VAEs on the same images: `vaehelpers compare RUN other-vae --data DIR --out C`.
# - Compare runs: a `small` model, the `seed` recipe, a perceptual weight, a longer run.
# - Export the weights for diffusers: `vaehelpers convert RUN out/ --to diffusers`.
