# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Architecture: Stable Diffusion's KL autoencoder
#
# The model is the KL-f8 autoencoder of Stable Diffusion: an encoder of ResNet blocks (GroupNorm, SiLU) that
# halves the resolution three times, a self-attention block in the middle, and a decoder that mirrors it. It
# maps a 128x128 image to a 4x16x16 latent, 48 times fewer numbers. This notebook builds it, counts its
# parameters part by part, and follows a batch through it.

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
interactive = True   # False (papermill, make demo): no widgets; declared so that a batch run can pass it to all five
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
from vaehelpers import notebook, viz
from vaehelpers.config import MODEL_PRESETS
from vaehelpers.model import AutoencoderKL, parameter_table, trace_shapes

# %% [markdown]
# The parameters above, with every None filled in for the scale chosen; everything below reads them from here.

# %%
settings = notebook.setup(
    smoke, data_source=data_source, data_dir=data_dir, run_dir=run_dir, figures_dir=figures_dir,
    image_size=image_size, preset=preset, recipe=recipe, epochs=epochs, device=device)

# %% [markdown]
# ## Step 1: Build the model
#
# A preset names a `ModelConfig`: `sd` is Stable Diffusion's (base width 128, multipliers 1, 2, 4, 4), `small`
# and `tiny` are narrower versions of the same design for CPUs and tests.

# %%
model = AutoencoderKL.from_preset(settings.preset).eval()
model.config

# %% [markdown]
# ## Step 2: Where the parameters are
#
# Most of the weights sit in the widest levels; the decoder is larger than the encoder (one more ResNet block per
# level, as in SD), because turning a small latent back into detail is the harder half of the job.

# %%
for part, count in parameter_table(model):
    print(f"{part:<42}{count:>14,}")

# %% [markdown]
# ## Step 3: Tensor shapes, from pixels to latents and back
#
# One held-out image goes through; each encoder level halves the side, the moments hold a mean and a
# log-variance per latent channel (hence 8 channels for 4 latents), and the decoder doubles its way back.

# %%
images = settings.dataset("test")[0][None]  # (1, 3, S, S) in [-1, 1]
for part, shape in trace_shapes(model, images):
    print(f"{part:<28}{str(shape):>22}")

# %% [markdown]
# ## Step 4: The latent
#
# `encode` returns a posterior: a Gaussian per latent value. Training decodes a sample of it; evaluation decodes
# its mean (`mode()`). `kl()` measures, per image, how far the posterior is from N(0, I): the term that keeps the
# latent space smooth enough to sample from and to train a diffusion model on.

# %%
with torch.no_grad():
    posterior = model.encode(images)
latents = posterior.sample(generator=torch.Generator().manual_seed(0))
print(f"latents {tuple(latents.shape)}: {latents[0].numel():,} numbers for {images[0].numel():,} pixel values "
      f"({images[0].numel() / latents[0].numel():.0f}x fewer); KL per image {posterior.kl().item():.1f}")

# %% [markdown]
# An untrained model's latents are noise, and so is its reconstruction: this is where training starts.

# %%
with torch.no_grad():
    reconstructions = model.decode(posterior.mode())
viz.reconstruction_figure(images, reconstructions, titles=["untrained"])

# %% [markdown]
# ## Step 5: Weights that move to and from diffusers
#
# Module and parameter names are exactly those of diffusers' `AutoencoderKL`, so a state dict loads in either
# direction with `strict=True`, and `vaehelpers convert RUN DEST --to diffusers` writes a folder that
# `diffusers.AutoencoderKL.from_pretrained(DEST)` opens (`--to ldm` writes the original SD checkpoint layout).
# The first few keys:

# %%
list(model.state_dict())[:8]

# %% [markdown]
# ## Step 6: The presets side by side
#
# Built on the `meta` device, which allocates no memory, so even `sd` costs nothing to count.

# %%
for name in MODEL_PRESETS:
    with torch.device("meta"):
        print(f"{name:<6}{parameter_table(AutoencoderKL.from_preset(name))[-1][1]:>14,} parameters")

# %% [markdown]
# ## Now it's your turn
#
# - `vaehelpers info --preset sd --image-size 256` prints the same tables for any size.
# - Change `channel_multipliers` or `latent_channels` in a `ModelConfig` and see what happens to the shapes.
# - Next: **03_loss**, what the model is trained to minimise.
