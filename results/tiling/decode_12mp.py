"""Decode-only check at 12 MP (sd run dir, e.g. random init): the tiled decode's pass 1 (its memory peak) and tiles.

/usr/bin/time -v timeout 1500 python results/tiling/decode_12mp.py RUN
"""

import logging
import sys
import time

import torch

from vaehelpers import tiling
from vaehelpers.model import AutoencoderKL

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
model = AutoencoderKL.load(sys.argv[1]).eval()
latents = torch.randn(1, 4, 375, 500, generator=torch.Generator().manual_seed(0))  # a 4000x3000 image's
plan, why = tiling.decide(128, 3000, 4000, "auto", "cpu")
print(why, flush=True)
with torch.no_grad(), model.tiled(plan.tile, plan.overlap, plan.stats_tiles):
    start = time.time()
    model.decode(latents)
print("decode seconds", time.time() - start, flush=True)
