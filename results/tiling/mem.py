"""Untiled encode (enc) or encode + decode (dec) of one random image: /usr/bin/time -v python mem.py sd 512 512 dec"""

import sys
import time

import torch

from vaehelpers.model import AutoencoderKL

model = AutoencoderKL.from_preset(sys.argv[1]).eval()
height, width = int(sys.argv[2]), int(sys.argv[3])
images = torch.rand(1, 3, height, width) * 2 - 1
with torch.no_grad():
    start = time.time()
    latents = model.encode(images).mode()
    if sys.argv[4] == "dec":
        model.decode(latents)
print(sys.argv[1:], f"{time.time() - start:.1f} s")
