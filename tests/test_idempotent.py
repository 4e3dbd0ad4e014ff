"""Idempotent, repeatable runs: a finished stage rerun with the same inputs is a no-op returning
the same artifact; another run never writes into a stage folder that is not its own; a restarted
process of the same run takes its claim back, and the process it replaced writes nothing more."""

import json
import uuid
from pathlib import Path

import pytest
from gcs_fault_proxy import FaultProxy
from test_preemption import small_init_model

from carclassifier import storage
from carclassifier.artifacts import make_run_key
from carclassifier.checkpoints import StageConflictError, claim_stage, write_checkpoint
from carclassifier.config import load_config
from carclassifier.prepare import validate_and_split
from carclassifier.stages import run_stage, stage_fingerprint

STAGE = "stages=[{name: stage_1, epochs: 1, unfreeze: 0.5, learning_rate: 0.01}]"


def _config(out, data, *extra):
    return load_config(None, [f"data.root={data}", f"output_dir={out}", "model.weights=null",
                              "input.image_size=32", "input.batch_size=4", STAGE, *extra])  # fmt: skip


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, storage.sha256_file(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def setup(make_folder_dataset, tmp_path):
    data = make_folder_dataset(per_class=4)
    config = _config(tmp_path / "run", data)
    prepared = validate_and_split(config, tmp_path / "run", progress=False)
    init = str(small_init_model(tmp_path / "init.keras"))
    return data, config, prepared, init


def test_a_finished_stage_is_a_no_op_and_other_runs_are_refused(setup, tmp_path):
    data, config, prepared, init = setup
    out = tmp_path / "run" / "stages" / "stage_1"
    first = run_stage(config, "stage_1", prepared, str(out), init)
    before = _snapshot(out)
    again = run_stage(config, "stage_1", prepared, str(out), init)
    assert again.skipped and again.best_model == first.best_model
    assert again.metrics == first.metrics and first.metrics["fingerprint"]
    assert _snapshot(out) == before  # nothing rewritten

    other_lr = _config(tmp_path / "run", data, "stages.stage_1.learning_rate=0.5")
    with pytest.raises(StageConflictError, match=r"holds stage_1 finished by another run"):
        run_stage(other_lr, "stage_1", prepared, str(out), init)
    other_init = str(small_init_model(tmp_path / "other.keras", num_classes=3))
    Path(other_init).write_bytes(Path(other_init).read_bytes() + b"\0")  # other content
    with pytest.raises(StageConflictError, match="give this run its own output location"):
        run_stage(config, "stage_1", prepared, str(out), other_init)
    assert _snapshot(out) == before


def test_another_run_cannot_write_into_a_started_stage(setup, tmp_path):
    data, config, prepared, init = setup
    stage = config.stage("stage_1")
    out = tmp_path / "run" / "stages" / "stage_1"
    claim_stage(str(out), stage, stage_fingerprint(config, stage, prepared, init))  # then crashed
    other = _config(tmp_path / "run", data, "data.seed=7")
    with pytest.raises(StageConflictError, match="holds stage 'stage_1' of another run"):
        run_stage(other, "stage_1", prepared, str(out), init)
    assert sorted(p.name for p in out.iterdir()) == ["stage.json"]  # nothing else written


def test_gcs_claim_is_exclusive_and_a_restart_of_the_same_run_takes_it_over(
    setup, gcs_emulator, monkeypatch, tmp_path
):
    _, config, _, _ = setup
    stage = config.stage("stage_1")
    with FaultProxy(gcs_emulator) as proxy:  # enforces ifGenerationMatch, as GCS does
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        bucket = storage.gcs_client().create_bucket(f"claim-{uuid.uuid4().hex[:8]}")
        out = f"gs://{bucket.name}/run-a/stages/stage_1"
        first = claim_stage(out, stage, "run-a")
        assert any("ifGenerationMatch=0" in s[1] for s in proxy.seen)
        with pytest.raises(StageConflictError, match="another run"):
            claim_stage(out, stage, "run-b")
        second = claim_stage(out, stage, "run-a")  # the pod restarted after a crash
        assert second != first
        assert json.loads(storage.read_text(f"{out}/stage.json"))["owner"] == second
        import keras

        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        with pytest.raises(StageConflictError, match="taken over"):  # the old pod, if alive
            write_checkpoint(out, 1, model, {"epoch": 1}, tmp_path, keep=2, owner=first)
        write_checkpoint(out, 1, model, {"epoch": 1}, tmp_path, keep=2, owner=second)
        assert storage.exists(f"{out}/checkpoints/latest.json")


def test_different_runs_get_different_prefixes(setup, tmp_path):
    data, config, prepared, _ = setup
    same = make_run_key(_config(tmp_path / "elsewhere", data), prepared)
    assert make_run_key(config, prepared) == same  # where the outputs go does not matter
    other = _config(tmp_path / "run", data, "stages.stage_1.learning_rate=0.5")
    assert make_run_key(other, prepared) != same
