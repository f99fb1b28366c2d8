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
# # 01 · Data: the images the autoencoder learns from
#
# An autoencoder learns to squeeze images through a small latent and back, so everything it learns comes from
# its images. The reference run uses **flickr8k**: 8,091 everyday photos (people, dogs, streets) of varied size.
# This notebook fetches them, splits them into training and held-out images, reports any file that cannot be
# used, builds a cache of decoded images for fast epochs, and shows what the model will see.
#
# Run it on Kaggle with flickr8k attached, on your machine with any folder of images, or with `smoke=True` on
# procedural images (no download at all).

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
synthetic_count = None   # images made when data_source is "synthetic"; None: 256 (smoke: 128)
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
# The notebooks call the package for all real work, so the same code runs here, in the tests and on the command line.

# %%
# %matplotlib inline
import torch
from vaehelpers import notebook, viz
from vaehelpers.images import list_images

# %% [markdown]
# The parameters above, with every None filled in for the scale chosen; everything below reads them from here.

# %%
settings = notebook.setup(
    smoke, data_source=data_source, data_dir=data_dir, run_dir=run_dir, figures_dir=figures_dir,
    image_size=image_size, preset=preset, recipe=recipe, epochs=epochs, device=device, synthetic_count=synthetic_count)

# %% [markdown]
# ## Step 1: Get the images
#
# Where the images come from depends on `data_source`:
#
# - **flickr8k**: an attached Kaggle input (Add Input, search `adityajn105/flickr8k`) is used where it is;
#   otherwise the kaggle API downloads it once into `data_dir` (it needs your API token, see the error message).
# - **folder**: every image under `data_dir`, recursively, in any common format.
# - **synthetic**: procedural pictures (shapes on textures), made here in a second; the embedded default of the demo.

# %%
images_dir = settings.image_folder()
files = list_images(images_dir)
print(f"{len(files)} image files in {images_dir}")

# %% [markdown]
# ## Step 2: Split, and build the cache
#
# A stable hash of each file's path puts about 10% of the files in the held-out `test` split, so the same file
# always lands on the same side whatever else is in the folder, and training never sees a test image. Building
# a dataset decodes every image once (one process per core), resizes its shorter side to `image_size` and appends
# the pixels as uint8 to cache shards on disk; later epochs, and the other notebooks, read the shards instead of
# decoding JPEGs again.

# %%
train_set = settings.dataset("train")
test_set = settings.dataset("test")
print(train_set)
print(test_set)

# %% [markdown]
# ## Step 3: Files that cannot be used
#
# A file that is empty, truncated, not an image, tiny, or a decompression bomb is reported once, with its path
# and the reason, and left out; it never stops a run halfway through an epoch. A clean dataset shows 0 skipped.

# %%
print(train_set.report.summary())
print(test_set.report.summary())

# %% [markdown]
# ## Step 4: Look at the images
#
# A grid of training images as the model receives them for evaluation: shorter side resized to `image_size`, then
# the centre square. The figure is saved as `sample_grid.png` in the figures folder.

# %%
samples = torch.stack([train_set[i] for i in range(min(16, len(train_set)))])
fig = viz.image_grid(samples, nrow=8, title=f"{len(train_set)} training images, {settings.image_size} px")
viz.save_figure(fig, settings.figures_dir / "sample_grid.png")
fig

# %% [markdown]
# During training each epoch sees a different random square of each image, sometimes mirrored (augmentation),
# so the model cannot memorise exact pixels. Here is one image over four epochs.

# %%
augmented, views = settings.dataset("train", augment=True), []
for epoch in range(4):
    augmented.set_epoch(epoch)
    views.append(augmented[0])
viz.image_grid(views, nrow=4, titles=[f"epoch {epoch}" for epoch in range(4)])

# %% [markdown]
# ## Step 5: What the model receives
#
# Images go into the model as float tensors of shape (3, S, S) with values in [-1, 1]: the range Stable
# Diffusion's autoencoder uses. Metrics later map back to [0, 1] pixels.

# %%
print(f"one batch: {tuple(samples.shape)}, values in [{samples.min():.2f}, {samples.max():.2f}]")

# %% [markdown]
# ## Now it's your turn
#
# - Point `data_source="folder"` and `data_dir` at your own photos and run this notebook again.
# - Try a larger `image_size` (256): the cache grows with its square, the model's cost too.
# - Next: **02_architecture** shows the model these images go through.
