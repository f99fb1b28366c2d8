"""A WxH mosaic of BSDS500 test photos, each at its own size (portrait ones turned): python mosaic.py 4000 3000 OUT"""

import sys
from pathlib import Path

from PIL import Image

photos = sorted(Path(__file__).parents[2].joinpath("../shared/datasets/bsds500/test").resolve().glob("*.jpg"))
width, height = int(sys.argv[1]), int(sys.argv[2])
canvas = Image.new("RGB", (width, height))
index, top = 0, 0
while top < height:
    left = 0
    while left < width:
        photo = Image.open(photos[index % len(photos)]).convert("RGB")
        photo = photo.rotate(90, expand=True) if photo.height > photo.width else photo
        canvas.paste(photo, (left, top))
        left, index = left + photo.width, index + 1
    top += 321
canvas.save(sys.argv[3])
