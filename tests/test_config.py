from pathlib import Path

import pytest

from carclassifier.config import RunConfig, dump_config, load_config
from carclassifier.errors import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


def test_defaults_are_the_recipe_defaults():
    config = load_config()
    assert config.data.val_fraction == 0.2
    assert config.model.backbone == "efficientnet_lite0"
    assert config.input.pipeline == "tf_data"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), RunConfig)


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input:\n  batch_size: 4\n")
    config = load_config(
        path, ["input.batch_size=8", "model.head.dense_units=[256, 64]", "data.root=/x"]
    )
    assert config.input.batch_size == 8
    assert config.model.head.dense_units == [256, 64]
    assert config.data.root == "/x"


def test_round_trip_through_yaml(tmp_path):
    config = load_config(None, ["model.head.dropout=0.5"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("input.batch_sise=3", "input.batch_sise: unknown key"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("input.batch_size=many", "input.batch_size"),
        ("input.pipeline=keras", "input.pipeline"),
        ("model.head.dense_units=[0]", "model.head.dense_units"),
        ("nonsense", "not KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


STAGE = "{name: %s, epochs: 1, unfreeze: %s, learning_rate: 0.001%s}"


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (f"[{STAGE % ('a', 0.5, '')}, {STAGE % ('b', 0.25, '')}]", "stage b unfreezes 0.25 < 0.5"),
        (f"[{STAGE % ('a', 0.5, '')}, {STAGE % ('a', 1.0, '')}]", "repeated: \\['a'\\]"),
        (f"[{STAGE % ('a', 0, ', image_size: 300')}]", "300 px is not a multiple of 32"),
        (f"[{STAGE % ('a', 0, ', schedule: {kind: cosine}')}]", "both steer the learning rate"),
        (f"[{STAGE % ('a', 1.5, '')}]", "stages.0.unfreeze"),
        (f"[{STAGE % ('Stage 1', 0, '')}]", "stages.0.name"),
        ("[]", "stages"),
    ],
)
def test_impossible_recipes_fail_before_training(stages, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [f"stages={stages}"])


def test_refreeze_when_meant_and_stage_lookup():
    stages = f"[{STAGE % ('a', 0.5, '')}, {STAGE % ('b', 0.25, ', allow_refreeze: true')}]"
    config = load_config(None, [f"stages={stages}", "input.image_size=256"])
    assert config.stage("b").unfreeze == 0.25
    assert config.stage_image_size(config.stage("b")) == 256
    with pytest.raises(ConfigError, match="no stage 'c'"):
        config.stage("c")


def test_the_b6_recipe_is_the_recipe():
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "recipe_b6.yaml")
    assert config.model.backbone == "efficientnet_b6"
    assert [s.name for s in config.stages] == [
        "stage_1", "stage_2", "stage_3", "stage_4", "stage_5_1", "stage_5_2", "stage_5_3"]  # fmt: skip
    assert [s.unfreeze for s in config.stages] == [0.0, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert [config.stage_image_size(s) for s in config.stages][-3:] == [448, 448, 448]
    assert [s.learning_rate for s in config.stages][-3:] == [1e-5, 1e-6, 1e-7]


def test_a_stage_is_overridden_by_its_name():
    path = Path(__file__).resolve().parents[1] / "configs" / "recipe_b6.yaml"
    config = load_config(path, ["stages.stage_2.epochs=3", "stages.stage_5_1.image_size=384"])
    assert config.stage("stage_2").epochs == 3 and config.stage("stage_5_1").image_size == 384
    with pytest.raises(ConfigError, match="no stage named 'stage_9'"):
        load_config(path, ["stages.stage_9.epochs=3"])
    with pytest.raises(ConfigError, match="name a stage"):
        load_config(path, ["stages.epochs=3"])
