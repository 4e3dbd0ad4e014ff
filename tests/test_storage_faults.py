"""GCS faults: transient errors are retried with backoff, permanent ones fail fast and clearly.

The client talks to the real gcp-storage-emulator through `gcs_fault_proxy.FaultProxy`, which
injects HTTP 429/500/503, dropped connections, slow and lost answers, and 403s; the proxy's
request log proves how many attempts the client made.
"""

import logging
import uuid

import pytest
from gcs_fault_proxy import FaultProxy, Rule

from carclassifier import storage
from carclassifier.errors import StorageError

UPLOAD = r"^/upload/"
DOWNLOAD = r"alt=media"


@pytest.fixture
def proxy(gcs_emulator, monkeypatch):
    """The proxy in front of the emulator, with backoff shrunk to milliseconds."""
    monkeypatch.setenv(storage.RETRY_INITIAL_ENV, "0.01")
    monkeypatch.setenv(storage.RETRY_MAX_ENV, "0.05")
    monkeypatch.setenv(storage.RETRY_DEADLINE_ENV, "20")
    monkeypatch.setenv(storage.TIMEOUT_ENV, "5")
    with FaultProxy(gcs_emulator) as running:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", running.url)
        yield running


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_http_errors_are_retried(bucket, proxy, tmp_path, caplog, status):
    uri = f"gs://{bucket.name}/ckpt/model.bin"
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights" * 1000)
    proxy.rules = [
        Rule(path=UPLOAD, status=status, times=2),
        Rule(path=DOWNLOAD, status=status, times=2),
    ]
    with caplog.at_level(logging.WARNING, logger="carclassifier.storage"):
        storage.put_file(source, uri)
        copy = storage.get_file(uri, tmp_path / "copy.bin")
    assert copy.read_bytes() == source.read_bytes()
    faults = proxy.faults()
    assert [f[2] for f in faults] == [str(status)] * 4, proxy.seen
    retries = [r.getMessage() for r in caplog.records if "retry attempt" in r.getMessage()]
    assert any(f"upload {uri}" in m and "retry attempt 2" in m for m in retries), retries
    assert any(f"download {uri}" in m and f"HTTP {status}" in m for m in retries), retries


def test_dropped_connections_and_lost_answers_are_retried(bucket, proxy):
    uri = f"gs://{bucket.name}/state.json"
    proxy.rules = [
        Rule(path=UPLOAD, action="close"),
        Rule(method="GET", path="state.json", action="close"),
    ]
    storage.write_text(uri, '{"epoch": 1}')
    assert storage.read_text(uri) == '{"epoch": 1}'
    assert [f[2] for f in proxy.faults()] == ["close", "close"]
    # A conditional create whose first attempt was stored but whose answer was lost: the retry
    # gets 412 from the server, which is recognised as our own write.
    claim = f"gs://{bucket.name}/claim.json"
    proxy.rules = [Rule(path=UPLOAD, action="lost")]
    before = len(proxy.seen)
    assert storage.create_text(claim, '{"owner": "a"}')
    uploads = [s for s in proxy.seen[before:] if s[1].startswith("/upload/")]
    assert len(uploads) == 2 and uploads[0][2] == "lost", proxy.seen
    assert not storage.create_text(claim, '{"owner": "b"}')
    assert storage.read_text(claim) == '{"owner": "a"}'


def test_a_slow_response_times_out_and_is_retried(bucket, proxy, monkeypatch):
    uri = f"gs://{bucket.name}/latest.json"
    storage.write_text(uri, "{}")
    monkeypatch.setenv(storage.TIMEOUT_ENV, "0.5")
    proxy.rules = [Rule(method="GET", path="latest.json", action="delay", delay=2.0)]
    before = len(proxy.seen)
    assert storage.read_text(uri) == "{}"
    gets = [s for s in proxy.seen[before:] if s[0] == "GET" and "latest.json" in s[1]]
    assert gets[0][2] == "delay" and gets[1] == (*gets[0][:2], "forwarded"), gets


def test_forbidden_fails_fast_with_a_clear_message(bucket, proxy, tmp_path):
    uri = f"gs://{bucket.name}/run/best.keras"
    source = tmp_path / "best.keras"
    source.write_bytes(b"x")
    proxy.rules = [Rule(path=UPLOAD, status=403, times=100)]
    with pytest.raises(StorageError, match="no permission to write") as error:
        storage.put_file(source, uri)
    assert uri in str(error.value) and "roles/storage" in str(error.value)
    assert len([s for s in proxy.seen if s[1].startswith("/upload/")]) == 1  # not retried


def test_missing_bucket_fails_fast(gcs_emulator, proxy):
    uri = f"gs://no-such-bucket-{uuid.uuid4().hex[:6]}/stages/stage_1/stage.json"
    with pytest.raises(StorageError, match="not found.*check that bucket 'no-such-bucket"):
        storage.write_text(uri, "{}")
    assert len([s for s in proxy.seen if s[1].startswith("/upload/")]) == 1  # not retried


def test_transient_errors_that_do_not_stop_give_up_at_the_deadline(bucket, proxy, monkeypatch):
    monkeypatch.setenv(storage.RETRY_DEADLINE_ENV, "0.3")
    uri = f"gs://{bucket.name}/metrics.json"
    proxy.rules = [Rule(path=UPLOAD, status=503, times=10_000)]
    with pytest.raises(StorageError, match="gave up trying to write .*metrics.json.*HTTP 503"):
        storage.write_text(uri, "{}")
    assert len(proxy.faults()) >= 2  # it did retry before giving up


def test_conditional_writes_do_not_clobber(bucket, proxy, tmp_path):
    uri = f"gs://{bucket.name}/checkpoints/latest.json"
    assert storage.create_text(uri, "1")
    text, generation = storage.read_versioned(uri)
    assert text == "1" and generation
    storage.write_text(uri, "2", if_generation_match=generation)
    with pytest.raises(storage.PreconditionFailedError, match="changed by another writer"):
        storage.write_text(uri, "3", if_generation_match=generation)  # stale: someone wrote 2
    assert storage.read_text(uri) == "2"
    local = tmp_path / "claim.json"
    assert storage.create_text(str(local), "a") and not storage.create_text(str(local), "b")
    assert local.read_text() == "a" and not list(tmp_path.glob("*.partial"))


def test_a_stage_checkpoints_to_gcs_through_transient_errors(
    bucket, proxy, make_folder_dataset, tmp_path, caplog
):
    from test_preemption import small_init_model

    from carclassifier.config import load_config
    from carclassifier.prepare import validate_and_split
    from carclassifier.stages import run_stage

    data = make_folder_dataset(per_class=4)
    config = load_config(None, [f"data.root={data}", f"output_dir={tmp_path / 'run'}",
                                "model.weights=null", "input.image_size=32", "input.batch_size=4",
                                "stages=[{name: s1, epochs: 2, unfreeze: 0.5, learning_rate: 0.01}]"])  # fmt: skip
    prepared = validate_and_split(config, tmp_path / "run", progress=False)
    init = str(small_init_model(tmp_path / "init.keras"))
    out = f"gs://{bucket.name}/run/stages/s1"
    proxy.rules = [
        Rule(path=UPLOAD, status=503, times=3),
        Rule(path=UPLOAD, action="close", times=2),
        Rule(method="GET", path="latest.json", status=429, times=2),
    ]
    with caplog.at_level(logging.INFO):
        result = run_stage(config, "s1", prepared, out, init)
    assert result.metrics["epochs_run"] == 2
    assert len(proxy.faults()) == 7, proxy.faults()
    assert "retry attempt" in caplog.text and "s1 epoch 2/2" in caplog.text
    pointer = storage.read_text(f"{out}/checkpoints/latest.json")
    assert '"epoch": 2' in pointer
