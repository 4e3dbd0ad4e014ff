"""Bad arguments (issue #6, fault 5): every CLI command checks its arguments before it does
anything and answers a mistake with one ``error:`` line and exit status 2 — no traceback, no
half-written output; a light hypothesis fuzz of whole command lines; the pipeline's parameters
are checked the same way before a run is submitted."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carclassifier import cli_commands
from carclassifier.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str]:  # noqa: ANN001 - pytest's capsys
    """Exit status and the stderr of ``carclassifier argv`` run in-process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in err, err
    assert lines[-1].startswith("error: "), lines[-1]
    assert expected in lines[-1], (expected, lines[-1])


@pytest.fixture
def paths(tmp_path):
    """An empty dataset folder, a .keras-named file, an export folder and a missing path."""
    (tmp_path / "data").mkdir()
    (tmp_path / "model.keras").write_bytes(b"not a model")
    (tmp_path / "export").mkdir()
    (tmp_path / "labels.json").write_text('{"not": "a list"}')
    return {
        "data": str(tmp_path / "data"),
        "model": str(tmp_path / "model.keras"),
        "export": str(tmp_path / "export"),
        "labels": str(tmp_path / "labels.json"),
        "missing": str(tmp_path / "missing"),
        "out": str(tmp_path / "out"),
    }


BAD_COMMANDS = {
    "data folder missing": (["prepare", "--data", "{missing}"], "--data {missing}: no such folder"),
    "config missing": (["eda", "--config", "{missing}"], "--config {missing}: no such file"),
    "split missing": (["train", "--data", "{data}", "--split", "{missing}"], "--split"),
    "override out of range": (["prepare", "--set", "input.batch_size=0"], "input.batch_size"),
    "override not YAML": (["prepare", "--set", "input.batch_size=[8"], "not valid YAML"),
    "override not KEY=VALUE": (["prepare", "--set", "batch_size"], "not KEY=VALUE"),
    "seed too large": (["prepare", "--set", "data.seed=99999999999"], "data.seed"),
    "weights from http": (
        ["prepare", "--set", "model.weights=http://example.com/w.h5"],
        "only local paths and gs://",
    ),
    "out is a URI": (
        ["prepare", "--data", "{data}", "--out", "gs://bucket/run"],
        "must be a local path",
    ),
    "output_dir URI in config": (
        ["train", "--data", "{data}", "--set", "output_dir=gs://my-bucket/runs"],
        "this command writes local files",
    ),
    "unknown stage": (
        [
            "train-stage",
            "--data",
            "{data}",
            "--out",
            "{out}",
            "--stage",
            "nope",
            "--stage-out",
            "{out}/s",
        ],
        "no stage 'nope'",
    ),
    "bad bucket": (
        ["train-stage", "--stage", "stage_1", "--stage-out", "gs://Bad_Bucket/s"],
        "not a valid Cloud Storage bucket name",
    ),
    "bucket without object": (
        ["train-stage", "--stage", "stage_1", "--stage-out", "gs://my-bucket"],
        "names a bucket but no object",
    ),
    "init from s3": (
        ["train-stage", "--stage", "stage_2", "--stage-out", "{out}", "--init", "s3://b/m.keras"],
        "only local paths and gs://",
    ),
    "gs:/ typo": (["evaluate", "--model", "gs:/bucket/m.keras"], "is malformed"),
    "model missing": (["evaluate", "--model", "{missing}"], "--model {missing}: no such file"),
    "labels not a list": (
        ["export", "--model", "{model}", "--export-dir", "{out}", "--labels", "{labels}"],
        "expected a JSON list",
    ),
    "export dir is a file": (
        ["export", "--model", "{model}", "--export-dir", "{model}"],
        "exists and is not a folder",
    ),
    "images missing": (
        ["predict", "--model", "{export}", "--images", "{missing}", "--output", "{out}/s.csv"],
        "--images {missing}: no such folder",
    ),
    "output is a folder": (
        ["predict", "--model", "{export}", "--images", "{data}", "--output", "{data}"],
        "is a folder",
    ),
    "competition name": (
        ["download-kaggle", "--dest", "{out}", "--competition", "../../etc"],
        "not a Kaggle competition name",
    ),
    "dest is a URI": (["download-kaggle", "--dest", "gs://bucket/data"], "must be a local path"),
    "required flag missing": (["validate"], "required: --data"),
    "unknown flag": (["train", "--epochs", "3"], "unrecognized arguments: --epochs 3"),
    "unknown command": (["fly"], "invalid choice: 'fly'"),
    "bad choice": (["predict", "--format", "xml"], "invalid choice: 'xml'"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_bad_arguments_are_one_error_line(case, paths, capsys):
    argv, expected = BAD_COMMANDS[case]
    code, err = run_cli([a.format(**paths) for a in argv], capsys)
    assert code == 2, (code, err)
    assert_one_error_line(err, expected.format(**paths))
    assert not Path(paths["out"]).exists(), "a rejected command wrote output"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (lambda: __import__("carclassifier.config").config.RunConfig(name="bad name"), "name"),
        (lambda: yaml.safe_load("a: [1"), "invalid configuration"),
        (lambda: open("/nonexistent-dir/x.csv", "w"), "/nonexistent-dir/x.csv: No such file"),
    ],
    ids=["pydantic", "yaml", "path"],
)
def test_config_and_path_errors_from_inside_a_command_are_one_line(
    monkeypatch, paths, capsys, error, expected
):
    monkeypatch.setattr(cli_commands, "cmd_validate", lambda args: error())
    code, err = run_cli(["validate", "--data", paths["data"]], capsys)
    assert code == 2
    assert_one_error_line(err, expected)


def test_a_bug_keeps_its_traceback(monkeypatch, paths):
    def bug(args):  # noqa: ANN001
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_commands, "cmd_validate", bug)
    with pytest.raises(ZeroDivisionError):
        main(["validate", "--data", paths["data"]])


def test_an_unwritable_output_is_one_line(paths, make_folder_dataset, capsys):
    root = make_folder_dataset(per_class=2)
    out = f"{paths['model']}/run"  # under a file: cannot be created, even by root
    code, err = run_cli(["prepare", "--data", str(root), "--out", out], capsys)
    assert code == 2
    assert_one_error_line(err, "Not a directory")


# A light fuzz of whole command lines: random flags and values, then a tail that is always
# invalid (a missing data folder, ...) so that no example can start real work. Whatever the
# middle holds, the outcome is exit status 2 with an ``error:`` last line, never a traceback.
FLAGS = ["--config", "--set", "--data", "--out", "--split", "--stage", "--init", "--stage-out",
         "--model", "--export-dir", "--labels", "--images", "--output", "--sample-submission",
         "--format", "--dest", "--competition", "-v", "--tta", "--force", "--bogus"]  # fmt: skip
COMMANDS = {
    "prepare": ["--data", "{missing}"],
    "validate": ["--data", "{missing}"],
    "eda": ["--data", "{missing}"],
    "train": ["--data", "{missing}"],
    "train-stage": ["--data", "{missing}"],
    "evaluate": ["--data", "{missing}"],
    "export": ["--data", "{missing}"],
    "run-local": ["--data", "{missing}"],
    "predict": ["--images", "{missing}"],
    "download-kaggle": ["--competition", "Not/A/Name"],
}
tokens = st.one_of(
    st.sampled_from(FLAGS),
    st.text(alphabet=string.printable, max_size=15),
    st.sampled_from(["gs://bucket/x", "gs:/x", "s3://b/k", "input.batch_size=-1", "a=[", "{a: b}"]),
)


@settings(
    max_examples=60,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.sampled_from(sorted(COMMANDS)), st.lists(tokens, max_size=6))
def test_fuzzed_command_lines_end_in_one_error_line(paths, capsys, command, middle):
    tail = [a.format(**paths) for a in COMMANDS[command]]
    code, err = run_cli([command, *middle, *tail], capsys)
    assert code == 2, (command, middle, code, err)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")


# ---------------------------------------------------------------------------------------------
# Pipeline parameters and cluster options


RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipe_lite0_local.yaml"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    from pipelines.car_classifier import compile_pipeline

    return compile_pipeline(RECIPE, tmp_path_factory.mktemp("ir") / "p.yaml")


GOOD_ARGUMENTS = [
    {"gpu_type": "nvidia.com/gpu", "gpu_count": "1"},
    {"gpu_type": "NVIDIA_L4", "gpu_count": "0"},
    {"gpu_type": "nvidia.com/mig-1g.5gb", "gpu_count": "16"},
    {"checkpoint_root": "gs://my-bucket/carclassifier", "champion_pointer": ""},
    {"champion_pointer": "gs://my-bucket/carclassifier/champion.json", "min_improvement": 0.01},
    {"image_size": 0, "data_source": "kaggle"},
    {"image_size": 192, "data_source": "gs://my-bucket/data/cars", "backbone": "efficientnet_b0"},
    {"overrides": ["stages.stage_2.epochs=1", "input.batch_size=8"]},
]
BAD_ARGUMENTS = [
    ({"gpu_count": "-1"}, "gpu_count '-1' must be a whole number from 0 to 16"),
    ({"gpu_count": "1.5"}, "gpu_count '1.5'"),
    ({"gpu_count": True}, "gpu_count True"),
    ({"gpu_count": "17"}, "gpu_count '17'"),
    ({"gpu_count": 1}, "gpu_count 1 is a number, but the KFP driver reads GPU counts only as"),
    ({"image_size": 256}, "more work than its task timeout was compiled for"),
    ({"overrides": ["stages.stage_1.epochs=50"]}, "stage_1: the overrides make it 50 epochs"),
    ({"gpu_type": "gpu"}, "not an accelerator type"),
    ({"gpu_type": "kubernetes.io/gpu"}, "not an accelerator type"),
    ({"gpu_type": "nvidia.com/"}, "not an accelerator type"),
    ({"gpu_type": "nvidia tesla t4"}, "not an accelerator type"),
    ({"checkpoint_root": "/mnt/checkpoints"}, "on a cluster it must be a gs://"),
    ({"checkpoint_root": "gs://My_Bucket/x"}, "not a valid Cloud Storage bucket name"),
    ({"checkpoint_root": "s3://bucket/x"}, "only local paths and gs://"),
    ({"champion_pointer": "gs://my-bucket"}, "names a bucket but no object"),
    ({"data_source": "http://example.com/cars.zip"}, "only local paths and gs://"),
    ({"image_size": 300}, "input.image_size: 300 px is not a multiple of 32"),
    ({"image_size": 4096}, "input.image_size: Input should be less than or equal to 2048"),
    ({"min_improvement": 2}, "min_improvement 2 must be a number from 0 to 1"),
    ({"min_improvement": float("nan")}, "min_improvement nan"),
    ({"overrides": "input.batch_size=8"}, "must be a list of KEY=VALUE strings"),
    ({"overrides": ["stages.stage_2.epochs=0"]}, "stages.1.epochs"),
    ({"overrides": ["input.batch_sise=8"]}, "input.batch_sise: unknown key"),
    ({"backbone": "efficientnet_b99"}, "efficientnet_b99"),
    (
        {"overrides": ["stages=[{name: s, epochs: 1, unfreeze: 0, learning_rate: 0.1}]"]},
        "compiled for",
    ),
]


def _recipe() -> tuple[str, list[str]]:
    from carclassifier.config import dump_config, load_config

    config = load_config(RECIPE)
    return dump_config(config), [s.name for s in config.stages]


@pytest.mark.parametrize("arguments", GOOD_ARGUMENTS, ids=lambda a: ",".join(a))
def test_good_pipeline_arguments_pass(arguments):
    from carclassifier.kubeflow.arguments import check_arguments

    assert check_arguments(arguments, *_recipe()) == arguments


@pytest.mark.parametrize(("arguments", "expected"), BAD_ARGUMENTS, ids=lambda a: str(a)[:40])
def test_bad_pipeline_arguments_fail_naming_the_parameter(arguments, expected):
    from carclassifier.errors import CarClassifierError
    from carclassifier.kubeflow.arguments import check_arguments

    with pytest.raises(CarClassifierError, match=expected.replace("(", r"\(")) as caught:
        check_arguments(arguments, *_recipe())
    assert "\n" not in str(caught.value)


def test_a_local_run_may_use_local_folders():
    from carclassifier.errors import CarClassifierError
    from carclassifier.kubeflow.arguments import check_arguments

    local = {"checkpoint_root": "/tmp/ckpt", "champion_pointer": "/tmp/ckpt/champion.json"}
    assert check_arguments(local, *_recipe(), on_cluster=False) == local
    with pytest.raises(CarClassifierError, match="on a cluster it must be a gs://"):
        check_arguments(local, *_recipe())


def test_submit_checks_parameters_before_any_network_call(compiled, capsys):
    from carclassifier.kubeflow import package as submit
    from carclassifier.kubeflow.arguments import check_arguments
    from pipelines.__main__ import main

    package = submit.load_package(compiled)
    assert package.recipe is not None and package.stage_names == tuple(_recipe()[1])
    assert package.defaults["gpu_count"] == "1"
    assert package.defaults["gpu_type"] == "nvidia.com/gpu"
    good = submit.resolve_params(
        submit.parse_params(["gpu_count=2", "checkpoint_root=gs://my-bucket/c"]), package
    )
    check_arguments({**package.defaults, **good}, package.recipe, package.stage_names)  # passes
    # Port 9 (discard) on localhost: had validation not stopped it, this would be a network error.
    argv = ["submit", "--host", "http://127.0.0.1:9", "--package", str(compiled)]
    for param, expected in [
        ("gpu_count=-1", "bad pipeline parameter: gpu_count '-1'"),
        ("gpu_type=gpu", "bad pipeline parameter: gpu_type 'gpu'"),
        ("checkpoint_root=gs://b/x", "bad pipeline parameter: checkpoint_root"),
        ("overrides=[input.batch_size=0]", "input.batch_size"),
    ]:
        assert main([*argv, "--param", param], environ={}) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, err


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"backoff_duration": "a minute"}, "not a duration"),
        ({"run_as_group": True}, "run_as_group True must be a non-root id"),
        ({"gpu_type": "nvidia tesla t4"}, "not an accelerator type"),
        ({"run_as_user": 0}, "run_as_user 0 must be a non-root id"),
    ],
)
def test_cluster_options_are_checked_when_the_pipeline_is_built(change, expected):
    from dataclasses import replace

    from carclassifier.errors import ConfigError
    from pipelines.car_classifier import ClusterOptions, Resources, build_pipeline

    with pytest.raises(ConfigError, match=expected):
        build_pipeline(RECIPE, options=replace(ClusterOptions(), **change))
    with pytest.raises(ConfigError, match="cpu request 8 must be positive and at most the limit"):
        build_pipeline(
            RECIPE, options=ClusterOptions(cpu_resources=Resources("8", "1Gi", "4", "2Gi"))
        )
    with pytest.raises(ConfigError, match="memory request 20Gi must be positive and at most"):
        build_pipeline(
            RECIPE, options=ClusterOptions(gpu_resources=Resources("6", "20Gi", "8", "16Gi"))
        )
    with pytest.raises(ConfigError, match="not a Kubernetes quantity"):
        build_pipeline(
            RECIPE, options=ClusterOptions(cpu_resources=Resources("2", "8 GB", "4", "16Gi"))
        )


def test_compile_rejects_a_bad_timeout_in_one_line(tmp_path, capsys):
    from pipelines.__main__ import compile_main

    args = ["--config", str(RECIPE), "--out", str(tmp_path / "p.yaml")]
    assert compile_main([*args, "--epoch-timeout", "15"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: epoch_timeout '15' is not a duration") and "\n" not in err
    assert not (tmp_path / "p.yaml").exists()
