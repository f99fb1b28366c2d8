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
# # 03 · Loss: what training minimises
#
# The loss has up to four terms: a **reconstruction** error in pixels, an optional **perceptual** error in the
# features of a pretrained VGG16 (LPIPS), a **KL** term that keeps the latents close to N(0, I), and an optional
# **PatchGAN** term that rewards realistic texture. This notebook computes each one on a real batch, plots how
# their weights change over training, and shows what the perceptual term looks at.

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
from vaehelpers.config import build_config
from vaehelpers.losses import VAELoss, kl_loss, reconstruction_loss
from vaehelpers.model import AutoencoderKL
from vaehelpers.train import check_pretrained

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
# ## Step 1: A real batch, and an untrained model's reconstructions
#
# Four training images, and what a freshly initialised model makes of them, decoded from a posterior sample as
# in training. Every term is large here: this is where training starts.

# %%
train_set = settings.dataset("train")
images = torch.stack([train_set[i] for i in range(4)]).to(device)
model = AutoencoderKL.from_preset(settings.preset).to(device).eval()
with torch.no_grad():
    reconstructions, posterior = model(images, sample_posterior=True, generator=torch.Generator(device).manual_seed(0))

# %% [markdown]
# The first two, with their error maps:

# %%
viz.reconstruction_figure(images[:2], reconstructions[:2])

# %% [markdown]
# ## Step 2: The loss as training computes it
#
# `VAELoss` is configured by the run's `LossConfig` (the recipe's weights) and returns the total and a dict of
# logs, the same values training writes to `log.csv` and TensorBoard.

# %%
cfg = settings.train_config()
check_pretrained(cfg, download=True)  # the ldm loss (reference scale) needs VGG16: fetched once, or one line saying how
loss, logs = VAELoss(cfg.loss, weights_dir=cfg.weights_dir or None).to(device)(images, reconstructions, posterior, step=0, epoch=0.0)
for name, value in logs.items():
    print(f"{name:<24}{value:>14.6g}")

# %% [markdown]
# ## Step 3: Each term on its own
#
# Three reconstruction errors on the same pair: L1 (the default: sharper than L2, as in LDM), L2, and the binary
# cross-entropy on [0, 1] the original project used. Then the KL in its two reductions: `sum` adds up every
# latent value per image (LDM's convention, hence its tiny weight of 1e-6), `seed` sums channels and averages
# positions (the original project's, with weight 1).

# %%
for kind in ("l1", "l2", "bce"):
    print(f"reconstruction {kind:<4}{reconstruction_loss(images, reconstructions, kind).item():>12.5f}")
for reduction in ("sum", "seed"):
    print(f"KL {reduction:<14}{kl_loss(posterior, reduction).item():>12.2f}")

# %% [markdown]
# ## Step 4: The weights over training
#
# Each recipe weighs the terms differently; the `seed` recipe scales pixels and features by 500 and ramps the
# KL weight up over its first 20 epochs, so that the autoencoder learns to reconstruct before it is pulled
# towards the prior. The `ldm` recipe sums L1 and LPIPS over the 3 x H x W values of each image, as LDM does, so
# per pixel they weigh 3 x H x W times their setting of 1.0 against a KL weight of 1e-6: the figure shows that
# per-pixel weight. It is saved as `loss_weights.png`.

# %%
recipes = {settings.recipe: cfg.loss, "seed": build_config(settings.preset, "seed").loss}
fig = viz.loss_weights_figure(recipes, epochs=settings.epochs, image_size=settings.image_size)
viz.save_figure(fig, settings.figures_dir / "loss_weights.png")
fig

# %% [markdown]
# ## Step 5: What the perceptual term sees
#
# LPIPS compares images by the features of a pretrained VGG16 at five depths: early layers see edges and
# colour, deep ones textures and parts. Bright areas below are where the reconstruction's features differ
# most. It needs the pretrained VGG16 weights (fetched in Step 2 at full scale, where the `ldm` recipe trains with
# this term; at smoke scale never downloaded); without them the figure says so, and the `pixel` recipe trains
# without this term (`perceptual_weight=0`).

# %%
viz.perceptual_figure(images, reconstructions)

# %% [markdown]
# The PatchGAN term (`loss.disc_weight > 0`): in the `ldm` recipe it starts at step 50,001 (weight 0.5), as in
# LDM, once reconstructions are good, and is weighed adaptively against the reconstruction gradient at the
# decoder's last layer; the `pixel` and `seed` recipes leave it off.
#
# ## Now it's your turn
#
# - Compare `recipe="seed"` with `ldm`: which terms dominate at epoch 0 and at epoch 20?
# - Next: **04_training**, putting the loss to work.
