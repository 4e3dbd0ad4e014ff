"""Secrets and trust (issue #6, security): no credential is logged, written into an artifact,
baked into an image or committed; models load only with ``safe_mode=True`` and nothing
untrusted is unpickled; the pipeline's containers run as the image's non-root user.

The leak test injects fake, unique credential values into the environment the way a pod gets
them (Kaggle, KFP, Google, AWS), runs local commands (validate, EDA with its prepare, a Kaggle
download against a fake client, a failing download, a submit refused for a bad parameter and
one to an unreachable host) and compiles the pipeline, then greps every file written, the
compiled YAML, stdout/stderr and the log records for those values (plain and base64).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from test_data import make_kaggle_layout

from carclassifier.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipe_lite0_local.yaml"
_BEGIN = "-----BEGIN "  # key headers are built from pieces, so this file passes its own scan


@pytest.fixture
def fake_secrets(monkeypatch, tmp_path) -> dict[str, str]:
    """Unique fake credential values in the environment, as a pod's secrets would put them."""
    values = {
        "KAGGLE_USERNAME": "kaggleuser" + secrets.token_hex(6),
        "KAGGLE_KEY": secrets.token_hex(16),  # the shape of a real Kaggle key
        "KFP_TOKEN": "kfp-token-" + secrets.token_urlsafe(24),
        "KFP_COOKIES": "authservice_session=" + secrets.token_urlsafe(24),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "PRIVATE_KEY_BODY": secrets.token_urlsafe(40),
    }
    key_file = tmp_path / "secret-mount" / "key.json"
    key_file.parent.mkdir()
    key_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "client_email": "sa@example.iam.gserviceaccount.com",
                "private_key": _BEGIN
                + "PRIVATE KEY-----\n"
                + values["PRIVATE_KEY_BODY"]
                + "\n-----END PRIVATE KEY-----\n",
            }
        )
    )
    for name, value in values.items():
        if name != "PRIVATE_KEY_BODY":
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    monkeypatch.setenv("CARCLASSIFIER_GCS_KEY_FILE", str(key_file))
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-config"))
    return values


def _needles(values: dict[str, str]) -> dict[str, bytes]:
    found = {}
    for name, value in values.items():
        found[name] = value.encode()
        found[f"{name} (base64)"] = base64.b64encode(value.encode())
    return found


def assert_no_secret_in(blob: bytes, where: str, values: dict[str, str]) -> None:
    for name, needle in _needles(values).items():
        assert needle not in blob, f"{name} leaked into {where}"


def assert_no_secret_under(folder: Path, values: dict[str, str]) -> int:
    """Grep every file under ``folder``; return how many were read."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    for path in files:
        assert_no_secret_in(path.read_bytes(), str(path), values)
    return len(files)


class FakeKaggleApi:
    """Stands in for ``kaggle.api.kaggle_api_extended.KaggleApi``: reads the credentials from
    the environment as the real client does, and "downloads" a zip made from ``source``."""

    source: Path
    fail_with: str | None = None

    def authenticate(self) -> None:
        import os

        self.user, self.key = os.environ["KAGGLE_USERNAME"], os.environ["KAGGLE_KEY"]

    def competition_download_files(self, competition, path, force=False, quiet=True):  # noqa: ANN001
        if self.fail_with:  # an HTTP error that echoes the credentials, as some clients do
            raise RuntimeError(self.fail_with.format(user=self.user, key=self.key))
        with zipfile.ZipFile(Path(path) / f"{competition}.zip", "w") as zf:
            for file in self.source.rglob("*"):
                if file.is_file():
                    zf.write(file, file.relative_to(self.source))


@pytest.fixture
def fake_kaggle(monkeypatch, tmp_path):
    FakeKaggleApi.source = make_kaggle_layout(tmp_path / "kaggle-source")
    FakeKaggleApi.fail_with = None
    module = types.ModuleType("kaggle.api.kaggle_api_extended")
    module.KaggleApi = FakeKaggleApi
    for name in ("kaggle", "kaggle.api"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", module)
    return FakeKaggleApi


def test_no_secret_in_logs_outputs_or_compiled_pipeline(
    fake_secrets, fake_kaggle, make_folder_dataset, tmp_path, capsys, caplog
):
    caplog.set_level(logging.DEBUG)
    root = make_folder_dataset(per_class=3)
    run = tmp_path / "run"
    assert main(["-v", "validate", "--data", str(root), "--out", str(run / "check")]) == 0
    assert main(["-v", "eda", "--data", str(root), "--out", str(run / "eda-run")]) == 0
    kaggle_dir = run / "kaggle"
    assert main(["-v", "download-kaggle", "--dest", str(kaggle_dir)]) == 0
    assert (kaggle_dir / "train.csv").is_file() and (kaggle_dir / "validation.json").is_file()
    fake_kaggle.fail_with = "401 Unauthorized for {user}:{key} at https://www.kaggle.com/api/v1"
    assert main(["download-kaggle", "--dest", str(run / "kaggle2"), "--force"]) == 2

    from pipelines.__main__ import main as pipelines_main
    from pipelines.car_classifier import compile_pipeline

    compiled = compile_pipeline(RECIPE, run / "pipeline.yaml", "registry.example.com/cc/t:1")
    base = ["submit", "--package", str(compiled), "--timeout", "2"]
    base += ["--pipeline-root", "gs://my-bucket/kfp", "--param", "data_source=gs://my-bucket/d"]
    assert pipelines_main([*base, "--host", "http://127.0.0.1:9", "--param", "gpu_count=-1"]) == 2
    assert pipelines_main([*base, "--host", "http://127.0.0.1:9"]) == 2  # nothing listens there

    out, err = capsys.readouterr()
    logs = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "EDA report" in out and "gpu_count '-1'" in err and "127.0.0.1:9" in err  # it all ran
    for where, text in (("stdout", out), ("stderr", err), ("log records", logs)):
        assert_no_secret_in(text.encode(), where, fake_secrets)
    written = assert_no_secret_under(run, fake_secrets)
    assert written >= 15  # config, validation, split, EDA page and PNGs, dataset, YAML, ...
    assert_no_secret_in(compiled.read_bytes(), "compiled pipeline", fake_secrets)
    # The credentials reach the pods by name only: secret references, never values.
    text = compiled.read_text()
    assert "kaggle-credentials" in text and "gcs-credentials" in text


def test_the_leak_check_can_fail(fake_secrets, tmp_path):
    (tmp_path / "log.txt").write_text(f"user={fake_secrets['KAGGLE_USERNAME']}")
    with pytest.raises(AssertionError, match="KAGGLE_USERNAME leaked"):
        assert_no_secret_under(tmp_path, fake_secrets)
    encoded = base64.b64encode(fake_secrets["KFP_TOKEN"].encode())
    with pytest.raises(AssertionError, match=r"KFP_TOKEN \(base64\) leaked"):
        assert_no_secret_in(b"Authorization: Basic " + encoded, "header", fake_secrets)


# ---------------------------------------------------------------------------------------------
# The committed tree

SECRET_PATTERNS = {
    "private key": re.compile(_BEGIN + r"(?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    "service-account key": re.compile(r'"private_key"\s*:\s*"' + _BEGIN),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "Kaggle key": re.compile(r"(?i)(?:kaggle_key|\"key\")\s*[:=]\s*\"?[0-9a-f]{32}\b"),
    "bearer token": re.compile(r"(?i)authorization:\s*bearer\s+[A-Za-z0-9._\-]{20,}"),
}
SECRET_FILE_NAMES = re.compile(
    r"(^|/)(kaggle\.json|\.env|[^/]*\.env|[^/]*\.pem|[^/]*\.key|[^/]*\.p12|key\.json|"
    r"[^/]*-key\.json|credentials\.json|application_default_credentials\.json|access_token)$"
)


def secrets_in(text: str) -> list[str]:
    """Names of the secret patterns found in ``text``."""
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def tracked_files() -> list[str]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [name for name in listed.decode().split("\0") if name]


def test_no_credentials_are_committed():
    files = tracked_files()
    assert len(files) > 50
    bad_names = [name for name in files if SECRET_FILE_NAMES.search(name)]
    assert not bad_names, f"credential-like files are tracked: {bad_names}"
    found = {}
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        hits = secrets_in(path.read_bytes().decode("utf-8", "replace"))
        if hits:
            found[name] = hits
    assert not found, f"secret-looking content in tracked files: {found}"


@pytest.mark.parametrize(
    "text",
    [
        _BEGIN + "RSA PRIVATE KEY-----\nMIIEow...",
        '{"type": "service_account", "private_key": "' + _BEGIN + 'PRIVATE KEY-----\\n"}',
        "aws_access_key_id = AKIA" + "ABCDEFGHIJKLMNOP",
        "token: ghp_" + "a" * 36,
        '{"username": "me", "key": "' + "0123456789abcdef" * 2 + '"}',
        "KAGGLE_KEY=" + "0123456789abcdef" * 2,
        "Authorization: Bearer " + "eyJhbGciOiJSUzI1NiJ9.abcdefghijk",
    ],
)
def test_the_tree_scan_can_fail(text):
    assert secrets_in(text)
    assert not secrets_in("KAGGLE_KEY: REPLACE_ME\nkey: value\nAuthorization: Bearer ${TOKEN}")


def test_no_image_build_context_can_carry_credentials():
    """Every Dockerfile's build context (its own .dockerignore, else the root one) leaves out
    credential files, wherever they lie."""
    from test_docker_manifests import ignored

    dockerfiles = sorted((ROOT / "docker").glob("*.Dockerfile"))
    assert dockerfiles
    for dockerfile in dockerfiles:
        own = dockerfile.with_name(dockerfile.name + ".dockerignore")
        ignore = own if own.is_file() else ROOT / ".dockerignore"
        patterns = [
            line.strip()
            for line in ignore.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")
        ]
        for path in (
            "kaggle.json",
            ".kaggle/kaggle.json",
            ".env",
            "deploy/prod.env",
            "server.pem",
            "tls/server.key",
            "key.json",
            "secrets/gcs-key.json",
            "credentials.json",
            ".config/gcloud/application_default_credentials.json",
        ):
            assert ignored(path, patterns), f"{dockerfile.name}: {path} reaches the builder"


# ---------------------------------------------------------------------------------------------
# Model files and pickles

SRC = ROOT / "src" / "carclassifier"
LOAD_CALL = re.compile(r"\b(?:keras\.models|keras\.saving|saving)\.load_model\s*\(")
PICKLE_USE = re.compile(
    r"^\s*(?:import\s+(?:pickle|cPickle|dill|joblib|cloudpickle)\b|from\s+(?:pickle|dill|joblib|"
    r"cloudpickle)\s+import)|\btorch\.load\s*\(|\bnp\.load\s*\([^)]*allow_pickle\s*=\s*True"
    r"|\bpd\.read_pickle\s*\(|\bshelve\.open\s*\(",
    re.MULTILINE,
)
RESTRICTED_UNPICKLER = SRC / "backbones" / "torch_legacy.py"


def _calls(text: str, pattern: re.Pattern[str]) -> list[str]:
    """Each match of ``pattern`` with its call's text up to the closing parenthesis."""
    found = []
    for match in pattern.finditer(text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        found.append(text[match.start() : end + 1])
    return found


def unsafe_model_loads(text: str) -> list[str]:
    """``load_model`` calls without ``safe_mode=True``."""
    return [
        call for call in _calls(text, LOAD_CALL) if not re.search(r"safe_mode\s*=\s*True", call)
    ]


def test_every_keras_model_load_uses_safe_mode():
    sources = sorted(SRC.rglob("*.py"))
    loads = 0
    for path in sources:
        text = path.read_text(encoding="utf-8")
        loads += len(_calls(text, LOAD_CALL))
        assert not unsafe_model_loads(text), f"{path}: {unsafe_model_loads(text)}"
    assert loads >= 3  # stages, export, serving: the scan is looking at real calls
    assert unsafe_model_loads("m = keras.models.load_model(path, compile=False)")
    assert unsafe_model_loads("keras.saving.load_model(p, safe_mode=False)")
    assert not unsafe_model_loads("keras.saving.load_model(\n  p,\n  safe_mode=True,\n)")


def test_nothing_is_unpickled_outside_the_restricted_reader():
    for path in sorted(SRC.rglob("*.py")):
        if path == RESTRICTED_UNPICKLER:
            continue
        hits = PICKLE_USE.findall(path.read_text(encoding="utf-8"))
        assert not hits, f"{path}: {hits}"
    reader = RESTRICTED_UNPICKLER.read_text(encoding="utf-8")
    assert "class _RestrictedUnpickler(pickle.Unpickler)" in reader
    assert "def find_class" in reader and "pickle.load(" not in reader
    assert "pickle.loads(" not in reader
    assert PICKLE_USE.search("import pickle\n") and PICKLE_USE.search("torch.load(f)")
    assert PICKLE_USE.search("np.load(p, allow_pickle=True)")


def test_the_restricted_unpickler_refuses_code(tmp_path):
    """A legacy torch file whose pickle names os.system is refused, and nothing runs."""
    import pickle

    from carclassifier.backbones.torch_legacy import _load_pickle
    from carclassifier.errors import BackboneError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    import io

    with pytest.raises(BackboneError, match="refusing to unpickle"):
        _load_pickle(io.BytesIO(pickle.dumps(Evil())))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# The pipeline's containers


def test_every_pipeline_task_runs_as_the_images_non_root_user(tmp_path):
    import yaml

    from pipelines.car_classifier import ClusterOptions, compile_pipeline

    spec, platform = yaml.safe_load_all(compile_pipeline(RECIPE, tmp_path / "p.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])  # every task
    dockerfile = (ROOT / "docker" / "trainer.Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    for name, config in executors.items():
        context = config["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user, name
    # Opting out (older KFP backends) leaves the field out entirely.
    off = ClusterOptions(run_as_user=None, run_as_group=None)
    _, platform = yaml.safe_load_all(
        compile_pipeline(RECIPE, tmp_path / "off.yaml", options=off).read_text()
    )
    assert all(
        "securityContext" not in c
        for c in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    )
