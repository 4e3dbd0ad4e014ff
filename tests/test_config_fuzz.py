"""Fuzzing the config loader with hypothesis: whatever YAML text, mapping or ``KEY=VALUE``
override comes in, `load_config` / `config_from_dict` either return a `RunConfig` or raise
`ConfigError` with a one-line message — never another exception type, never a traceback.

Bounded (``max_examples``, no deadline) so the whole file runs in a few seconds.
"""

from __future__ import annotations

import string
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carclassifier.config import RunConfig, config_from_dict, dump_config, load_config
from carclassifier.errors import ConfigError

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Keys that exist, so that many examples get past "unknown key" into the value checks.
SECTIONS = {
    "data": ["root", "test_dir", "val_fraction", "seed", "min_images_per_class"],
    "augment": ["preset", "train", "tta", "tta_views"],
    "evaluate": ["robustness"],
    "input": ["pipeline", "image_size", "batch_size", "workers"],
    "model": ["backbone", "weights", "head"],
    "train": ["mixed_precision", "jit_compile", "steps_per_epoch", "keep_checkpoints"],
}
TOP = ["name", "output_dir", "stages", *SECTIONS]
STAGE_KEYS = [
    "name", "description", "epochs", "unfreeze", "learning_rate", "image_size", "batch_size",
    "optimizer", "weight_decay", "label_smoothing", "reduce_lr", "schedule", "early_stopping",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "gs://bucket/x",
            "gs:/b",
            "s3://b/k",
            "imagenet",
            "cosine",
            "tf_data",
            "..",
            "",
            "uncropped",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.sampled_from(STAGE_KEYS)), inner, max_size=4
        ),
    ),
    max_leaves=12,
)
stage = st.dictionaries(st.sampled_from(STAGE_KEYS), values, max_size=6)
section = st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda name: st.tuples(
        st.just(name), st.dictionaries(st.sampled_from(SECTIONS[name]), values, max_size=4)
    )
)
mappings = st.one_of(
    st.dictionaries(st.sampled_from(TOP), values, max_size=5),
    st.lists(section, max_size=4).map(dict),
    st.builds(lambda stages: {"stages": stages}, st.lists(stage, max_size=3)),
    values,  # not even a mapping
)
key_parts = st.one_of(
    st.sampled_from([*TOP, *STAGE_KEYS, "stage_1", "stage_2", *sum(SECTIONS.values(), [])]),
    st.text(alphabet=string.ascii_letters + string.digits + "_.- ", max_size=8),
)
overrides = st.one_of(
    st.builds(
        lambda parts, value: ".".join(parts) + "=" + value,
        st.lists(key_parts, min_size=1, max_size=4),
        st.one_of(
            st.text(max_size=30),
            values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
            st.sampled_from(
                ["[unclosed", "{a: 1", "!!python/object:os.system", "*alias", "&a [*a]"]
            ),
        ),
    ),
    st.text(max_size=40),  # anything at all, "=" or not
)


def _check(call) -> RunConfig | None:  # noqa: ANN001 - a zero-argument callable
    """Run ``call``; only a RunConfig or a one-line ConfigError may come out."""
    try:
        result = call()
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        assert "Traceback" not in message
        return None
    assert isinstance(result, RunConfig)
    return result


@SETTINGS
@given(mappings)
def test_config_from_dict_raises_only_config_errors(data) -> None:
    config = _check(lambda: config_from_dict(data, "<fuzz>"))
    if config is not None:  # whatever validated must survive its own round trip
        assert config_from_dict(yaml.safe_load(dump_config(config))) == config


@SETTINGS
@given(st.lists(overrides, max_size=4))
def test_overrides_raise_only_config_errors(items) -> None:
    _check(lambda: load_config(None, items))


@SETTINGS
@given(
    st.one_of(
        st.text(max_size=200),
        mappings.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
        st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    ),
    st.lists(overrides, max_size=2),
)
def test_yaml_files_raise_only_config_errors(tmp_path_factory, text, items) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check(lambda: load_config(path, items))


@settings(max_examples=50, deadline=None, database=None)
@given(st.binary(max_size=64))
def test_undecodable_files_are_config_errors(tmp_path_factory, raw) -> None:
    path = Path(tmp_path_factory.mktemp("bin")) / "config.yaml"
    path.write_bytes(b"\xff\xfe" + raw)
    _check(lambda: load_config(path))


def test_the_fuzzer_reaches_both_outcomes() -> None:
    """The strategies above are not vacuous: some inputs load, some fail with ConfigError."""
    assert _check(lambda: load_config(None, ["input.batch_size=8"])) is not None
    assert _check(lambda: load_config(None, ["input.batch_size=[unclosed"])) is None
    assert _check(lambda: load_config(None, ["data.seed=99999999999"])) is None
    assert _check(lambda: load_config(None, ["output_dir=s3://bucket/x"])) is None
    assert _check(lambda: config_from_dict(["not", "a", "mapping"])) is None
