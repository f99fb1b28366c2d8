"""Config dataclasses: presets, recipes, type-checked overrides, JSON round trip."""

import pytest

from vaehelpers.config import (
    TrainConfig,
    apply_overrides,
    build_config,
    from_dict,
    load_json,
    model_config,
    recipe_settings,
    save_json,
    to_dict,
)


def test_seed_recipe_is_designs():
    cfg = build_config("sd", "seed")
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.data.resize) == ("adam", 1e-3, 16, "squash")
    assert cfg.loss.reconstruction == "bce" and cfg.loss.seed_scale == 500.0 and cfg.loss.batch_scaled_reconstruction
    assert (cfg.loss.perceptual, cfg.loss.perceptual_weight) == ("vgg", 0.1)
    assert (cfg.loss.kl_weight, cfg.loss.kl_warmup_epochs, cfg.loss.kl_reduction) == (1.0, 20.0, "seed")
    assert cfg.model.base_channels == 128


def test_flags_override_recipe_and_unknown_keys_raise():
    cfg = build_config("tiny", "seed", lr=3e-4, **{"loss.perceptual_weight": 0})
    assert cfg.lr == 3e-4 and cfg.loss.perceptual_weight == 0.0  # int widened to float
    with pytest.raises(KeyError, match="lossx"):
        build_config("tiny", "pixel", **{"lossx.kl_weight": 1.0})
    with pytest.raises(TypeError, match="batch_size"):
        apply_overrides(TrainConfig(), {"batch_size": "big"})
    with pytest.raises(ValueError, match="recipe"):
        recipe_settings("fancy")
    with pytest.raises(ValueError, match="preset"):
        model_config("huge")


def test_json_round_trip(tmp_path):
    cfg = build_config("small", "seed", epochs=3)
    save_json(cfg, tmp_path / "c.json")
    loaded = load_json(TrainConfig, tmp_path / "c.json")
    assert loaded == cfg and isinstance(loaded.model.channel_multipliers, tuple)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_train_config_default_names_its_model():
    from vaehelpers.config import MODEL_PRESETS

    cfg = TrainConfig()
    assert MODEL_PRESETS[cfg.preset] == cfg.model
    for name in MODEL_PRESETS:
        assert build_config(name).model == MODEL_PRESETS[name]


def test_cli_choices_come_from_config():
    from vaehelpers.cli import build_parser
    from vaehelpers.config import PRECISIONS, PRESETS, RECIPE_CHOICES

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {action.dest: action.choices for action in train._actions if action.choices}
    assert list(choices["preset"]) == list(PRESETS) == ["tiny", "small", "sd"]
    # today's recipes, then the deprecated alias that old commands still use
    assert list(choices["recipe"]) == list(RECIPE_CHOICES) == ["ldm", "pixel", "seed", "default"]
    assert list(choices["precision"]) == list(PRECISIONS)
