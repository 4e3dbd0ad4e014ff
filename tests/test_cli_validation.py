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

from carclassifier import cli
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
    monkeypatch.setattr(cli, "cmd_validate", lambda args: error())
    code, err = run_cli(["validate", "--data", paths["data"]], capsys)
    assert code == 2
    assert_one_error_line(err, expected)


def test_a_bug_keeps_its_traceback(monkeypatch, paths):
    def bug(args):  # noqa: ANN001
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_validate", bug)
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
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.sampled_from(sorted(COMMANDS)), st.lists(tokens, max_size=6))
def test_fuzzed_command_lines_end_in_one_error_line(paths, capsys, command, middle):
    tail = [a.format(**paths) for a in COMMANDS[command]]
    code, err = run_cli([command, *middle, *tail], capsys)
    assert code == 2, (command, middle, code, err)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")
