"""The offline quick start: synthetic images, a short tiny-model training run, held-out evaluation."""
from __future__ import annotations

from pathlib import Path


def run_demo(out: str | Path, minutes: float = 3.0) -> dict:
    """Make synthetic data, train `tiny` on CPU for `minutes`, evaluate on the held-out split, reconstruct a few.

    Writes under out/: data/, run/ (the run directory), evaluation.json, reconstructions/.
    """
    from vaehelpers import metrics
    from vaehelpers.data import ImageFolderDataset, list_images, make_synthetic
    from vaehelpers.model import AutoencoderKL
    from vaehelpers.reconstruct import format_rows, reconstruct_files
    from vaehelpers.config import build_config
    from vaehelpers.train import train

    out = Path(out)
    data_dir = out / "data"
    if not data_dir.exists() or not list_images(data_dir):
        make_synthetic(data_dir, count=256, size=64, seed=0)
    cfg = build_config("tiny", "default", run_dir=str(out / "run"), device="cpu", epochs=1000, max_minutes=minutes,
                       batch_size=8, lr=1e-3, checkpoint_every=200, **{"data.data_dir": str(data_dir), "data.image_size": 64})
    train(cfg, resume=True)
    model = AutoencoderKL.load(out / "run").eval()
    summary = metrics.evaluate(model, ImageFolderDataset(data_dir, split="test", image_size=64), batch_size=16)
    print(metrics.format_table(summary))
    metrics.write_json(summary, out / "evaluation.json")
    rows = reconstruct_files(model, list_images(data_dir)[:2], out / "reconstructions")
    print(format_rows(rows))
    return summary
