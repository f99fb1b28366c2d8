"""The memory of reconstruct's last stage at 12 MP (metrics and figures), with a stand-in reconstruction.

/usr/bin/time -v python results/tiling/end_stage_12mp.py PHOTO  (the model stages are measured separately)
"""

import sys

import torch

from vaehelpers import viz
from vaehelpers.images import load_image
from vaehelpers.metrics import per_image_metrics
from vaehelpers.reconstruct import pil_to_tensor

image = pil_to_tensor(load_image(sys.argv[1]))  # (3, H, W) in [-1, 1]
reconstruction = image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
latents = torch.randn(4, image.shape[1] // 8, image.shape[2] // 8)
metrics = per_image_metrics(image[None], reconstruction[None])
print({name: float(value[0]) for name, value in metrics.items()})
viz.save_figure(viz.reconstruction_figure(image[None], reconstruction[None], titles=["x"]), "/tmp/end_stage_r.png")
viz.save_figure(viz.latent_channels_figure(latents, titles=["x"]), "/tmp/end_stage_l.png")
