"""Shared test fixtures: the real photos in ../shared/datasets/bsds500 (skipped where absent), stand-in weights."""

import io
from pathlib import Path

import pytest
import torch

BSDS500 = (Path(__file__).parents[1] / "../shared/datasets/bsds500").resolve()


@pytest.fixture(scope="session")
def bsds500() -> Path:
    """The BSDS500 folder (train/ 200, val/ 100, test/ 200 JPEGs, 481x321 or 321x481); skips when absent."""
    if not BSDS500.is_dir():
        pytest.skip(f"BSDS500 photos not found at {BSDS500} (see ../shared/README.md)")
    return BSDS500


@pytest.fixture(scope="session")
def inception_dir(tmp_path_factory) -> Path:
    """A folder holding stand-in rFID weights: torch-fidelity's InceptionV3 with random weights, saved under the
    real file name (weights-inception-2015-12-05-6726825d.pth) with the real keys and shapes.

    He-normal convolutions: with PyTorch's default init the activations shrink about 3x per layer and the pool
    features of its 94 layers come out ~1e-8 and all alike, which would hide a plumbing fault.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from vaehelpers.fid import INCEPTION_WEIGHTS_NAME

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # its constructor loads weights; keep the random init instead
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    network = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.random.set_rng_state(generator_state)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(network.state_dict(), folder / INCEPTION_WEIGHTS_NAME)
    return folder
