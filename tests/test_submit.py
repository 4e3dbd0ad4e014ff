"""``python -m pipelines submit|schedule|unschedule|resume`` against a local fake of the KFP
v2beta1 REST API (tests/kfp_fake_server.py, which says what of it follows the real server).

No cluster: a stdlib HTTP server on 127.0.0.1 answers the calls an unmodified kfp.Client makes
and records them, and the tests assert on what was sent (multipart package bytes, run and
recurring-run bodies, query filters, auth headers) and on the one-line errors and exit status 2.
"""

# No `from __future__ import annotations` here: kfp reads the component's annotations as types.
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kfp import compiler, dsl

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pipelines` is a top-level folder of the repo, not installed
    sys.path.insert(0, str(REPO))

from kfp_fake_server import FakeKfpServer, Recorded  # noqa: E402

from carclassifier.kubeflow import cron as cron_module  # noqa: E402
from carclassifier.kubeflow import kfp_api  # noqa: E402
from carclassifier.kubeflow import package as pkg  # noqa: E402
from pipelines import __main__ as cli  # noqa: E402


@dsl.component(base_image="python:3.11-slim")
def _echo(epochs: int, lr: float, tag: str, flag: bool) -> str:
    return f"{epochs} {lr} {tag} {flag}"


@dsl.pipeline(name="tiny-train")
def _tiny(epochs: int, lr: float = 0.1, tag: str = "x", flag: bool = False, classes: list = []):  # noqa: B006
    _echo(epochs=epochs, lr=lr, tag=tag, flag=flag)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compiled two-step-free kfp pipeline with int/float/str/bool/list parameters."""
    path = tmp_path_factory.mktemp("pkg") / "tiny.yaml"
    compiler.Compiler().compile(_tiny, str(path))
    return path


@pytest.fixture(autouse=True)
def _hermetic_kfp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ~/.config/kfp/context.json and no KF_PIPELINES_* variables leak into kfp.Client."""
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for name in list(os.environ):
        if name.startswith(("KF_PIPELINES_", "KFP_")):
            monkeypatch.delenv(name)


@pytest.fixture
def server() -> Iterator[FakeKfpServer]:
    with FakeKfpServer() as fake:
        yield fake


def run_cli(*argv: str, environ: dict[str, str] | None = None) -> int:
    return cli.main(list(argv), environ=environ or {})


def submit_args(server: FakeKfpServer, package: Path, *extra: str) -> list[str]:
    return ["submit", "--host", server.url, "--package", str(package), *extra]


def posts(server: FakeKfpServer, path: str) -> list[Recorded]:
    return server.calls("POST", path)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------ submit


def test_submit_uploads_package_and_starts_run(
    server: FakeKfpServer, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = run_cli(
        *submit_args(server, package, "--pipeline-root", "gs://bucket/kfp-root/"),
        "--param",
        "epochs=3",
        "--param",
        "lr=1",
        "--param",
        "tag=007",
        "--param",
        "flag=true",
        "--param",
        "classes=[audi, bmw]",
    )
    out = capsys.readouterr().out
    assert rc == 0

    data = package.read_bytes()
    (upload,) = posts(server, "/pipelines/upload")
    assert upload.q("name") == "car-classifier"
    assert upload.fields["uploadfile"] == data
    assert upload.filenames["uploadfile"] == "tiny.yaml"
    pipeline_id = next(iter(server.pipelines))

    (upload_version,) = posts(server, "/pipelines/upload_version")
    loaded = pkg.load_package(package)
    assert upload_version.q("name") == pkg.default_version_name("car-classifier", loaded)
    assert upload_version.q("name") == f"car-classifier-{loaded.sha256[:12]}"
    assert upload_version.q("pipelineid") == pipeline_id
    assert upload_version.fields["uploadfile"] == data
    version_id = server.versions[pipeline_id][-1]["pipeline_version_id"]

    (create_experiment,) = posts(server, "/experiments")
    assert create_experiment.json["display_name"] == "carclassifier"
    experiment_id = next(iter(server.experiments))

    (create_run,) = posts(server, "/runs")
    body = create_run.json
    assert body["experiment_id"] == experiment_id
    assert body["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version_id,
    }
    assert "pipeline_spec" not in body  # runs reference the uploaded version, not inline specs
    runtime = body["runtime_config"]
    assert runtime["pipeline_root"] == "gs://bucket/kfp-root"
    params = runtime["parameters"]
    assert params == {
        "epochs": 3,
        "lr": 1.0,
        "tag": "007",
        "flag": True,
        "classes": ["audi", "bmw"],
    }
    assert type(params["epochs"]) is int and type(params["lr"]) is float
    assert type(params["flag"]) is bool and type(params["tag"]) is str

    run_id = next(iter(server.runs))
    assert out.splitlines() == [
        f"run id: {run_id}",
        f"run link: {server.url}/#/runs/details/{run_id}",
    ]


def test_same_package_twice_uploads_no_second_version(
    server: FakeKfpServer, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(*submit_args(server, package, "--param", "epochs=1")) == 0
    assert run_cli(*submit_args(server, package, "--param", "epochs=2")) == 0
    capsys.readouterr()

    assert len(posts(server, "/pipelines/upload")) == 1
    assert len(posts(server, "/pipelines/upload_version")) == 1
    assert len(posts(server, "/experiments")) == 1  # the second submit found it
    first, second = (r.json for r in posts(server, "/runs"))
    assert first["pipeline_version_reference"] == second["pipeline_version_reference"]
    assert first["experiment_id"] == second["experiment_id"]
    assert second["runtime_config"]["parameters"] == {"epochs": 2}
    # the lookups used the display-name filter kfp.Client itself sends
    version_lists = [r for r in server.requests if r.path.endswith("/versions")]
    assert all("car-classifier-" in (r.q("filter") or "") for r in version_lists)


def test_changed_package_uploads_a_new_version_only(
    server: FakeKfpServer, package: Path, tmp_path: Path
) -> None:
    changed = tmp_path / "tiny.yaml"
    changed.write_bytes(package.read_bytes() + b"# recompiled\n")
    assert run_cli(*submit_args(server, package, "--param", "epochs=1")) == 0
    assert run_cli(*submit_args(server, changed, "--param", "epochs=1")) == 0

    assert len(posts(server, "/pipelines/upload")) == 1
    names = [r.q("name") for r in posts(server, "/pipelines/upload_version")]
    assert len(names) == 2 and names[0] != names[1]
    assert (
        posts(server, "/pipelines/upload_version")[1].fields["uploadfile"] == changed.read_bytes()
    )
    first, second = (r.json for r in posts(server, "/runs"))
    assert (
        first["pipeline_version_reference"]["pipeline_version_id"]
        != second["pipeline_version_reference"]["pipeline_version_id"]
    )


def test_concurrent_upload_conflict_reuses_the_version(
    server: FakeKfpServer, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli(*submit_args(server, package, "--param", "epochs=1")) == 0
    real_find = kfp_api.find_version
    lookups: list[str] = []

    def racing_find(conn: kfp_api.KfpConnection, pipeline_id: str, name: str) -> object:
        lookups.append(name)  # first lookup misses, as if another submit raced us
        return None if len(lookups) == 1 else real_find(conn, pipeline_id, name)

    monkeypatch.setattr(kfp_api, "find_version", racing_find)
    assert run_cli(*submit_args(server, package, "--param", "epochs=1")) == 0
    assert len(lookups) == 2
    assert len(posts(server, "/pipelines/upload_version")) == 2  # the second one got a 409
    pipeline_id = next(iter(server.pipelines))
    assert len(server.versions[pipeline_id]) == 2  # the initial one + the hashed one, no third
    first, second = (r.json for r in posts(server, "/runs"))
    assert first["pipeline_version_reference"] == second["pipeline_version_reference"]


def test_explicit_version_name_with_other_content_is_refused(
    server: FakeKfpServer, package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = tmp_path / "tiny.yaml"
    changed.write_bytes(package.read_bytes() + b"# recompiled\n")
    assert run_cli(*submit_args(server, package, "--version", "v1", "--param", "epochs=1")) == 0
    capsys.readouterr()
    rc = run_cli(*submit_args(server, changed, "--version", "v1", "--param", "epochs=1"))
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = error_lines(err)
    assert "v1" in line and "other content" in line
    assert len(posts(server, "/runs")) == 1


def test_token_and_cookies_are_sent(package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeKfpServer(required_token="s3cret") as server:
        rc = run_cli(
            *submit_args(server, package, "--param", "epochs=1"),
            "--existing-token",
            "s3cret",
            "--cookies",
            "authservice_session=abc",
        )
        assert rc == 0, capsys.readouterr().err
        assert all(r.headers.get("authorization") == "Bearer s3cret" for r in server.requests)
        assert all(r.headers.get("cookie") == "authservice_session=abc" for r in server.requests)


def test_service_account_token_file_is_used(package: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    with FakeKfpServer(required_token="sa-token") as server:
        environ = {"KF_PIPELINES_SA_TOKEN_PATH": str(token)}
        rc = run_cli(*submit_args(server, package, "--param", "epochs=1"), environ=environ)
        assert rc == 0
        assert posts(server, "/runs")


def test_environment_variables_are_the_defaults(
    server: FakeKfpServer, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    environ = {
        "KFP_HOST": server.url,
        "EXPERIMENT": "nightly",
        "PIPELINE_ROOT": "gs://b/root",
        "KFP_NAMESPACE": "",  # empty counts as unset (make passes empty variables)
        "PIPELINE_PACKAGE": str(package),
    }
    assert run_cli("submit", "--param", "epochs=1", environ=environ) == 0
    assert posts(server, "/experiments")[0].json["display_name"] == "nightly"
    assert posts(server, "/runs")[0].json["runtime_config"]["pipeline_root"] == "gs://b/root"
    assert "unused" not in capsys.readouterr().err


def test_multi_user_needs_a_namespace_and_sends_it(
    package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeKfpServer(multi_user=True) as server:
        assert run_cli(*submit_args(server, package, "--param", "epochs=1")) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert "multi-user" in line and "--namespace" in line

        args = submit_args(server, package, "--param", "epochs=1", "--namespace", "team-a")
        assert run_cli(*args) == 0
        assert posts(server, "/pipelines/upload")[0].q("namespace") == "team-a"
        assert posts(server, "/experiments")[0].json["namespace"] == "team-a"
        assert server.calls("GET", "/pipelines")[-1].q("namespace") == "team-a"
        assert run_cli("unschedule", "--host", server.url, "--namespace", "team-a") == 0
        assert server.calls("GET", "/recurringruns")[-1].q("namespace") == "team-a"


# ------------------------------------------------------------------------- parameters, cron


def test_resolve_params_types(package: Path) -> None:
    loaded = pkg.load_package(package)
    raw = pkg.parse_params(["epochs=10", "lr=3", "tag=yes", "flag=off", "classes=[1, b]"])
    params = pkg.resolve_params(raw, loaded)
    assert params == {"epochs": 10, "lr": 3.0, "tag": "yes", "flag": False, "classes": [1, "b"]}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (["epochs"], "expected key=value"),
        (["=3"], "expected key=value"),
        (["epochs=1", "epochs=2"], "given twice"),
        (["epochs=1.5"], "expects an integer"),
        (["epochs=ten"], "expects an integer"),
        (["epochs=1", "lr=fast"], "expects a number"),
        (["epochs=1", "flag=maybe"], "expects true or false"),
        (["epochs=1", "classes=a"], "expects a YAML list"),
        (["epochs=[1"], "not a YAML value"),
        (["epochs=1", "bogus=1"], "no parameter 'bogus'"),
        (["lr=0.1"], "missing required pipeline parameter(s) epochs"),
    ],
)
def test_bad_params_fail_before_any_request(
    server: FakeKfpServer,
    package: Path,
    capsys: pytest.CaptureFixture[str],
    params: list[str],
    expected: str,
) -> None:
    args = [arg for p in params for arg in ("--param", p)]
    assert run_cli(*submit_args(server, package, *args)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert expected in line
    assert server.requests == []


def test_missing_package_and_bad_root(
    server: FakeKfpServer, package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("submit", "--host", server.url, "--package", str(tmp_path / "nope.yaml")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "not found" in line and "nope.yaml" in line

    not_a_pipeline = tmp_path / "other.yaml"
    not_a_pipeline.write_text("a: 1\n")
    assert run_cli("submit", "--host", server.url, "--package", str(not_a_pipeline)) == 2
    assert "not a compiled KFP v2 pipeline" in capsys.readouterr().err

    args = submit_args(server, package, "--param", "epochs=1", "--pipeline-root", "bucket/x")
    assert run_cli(*args) == 2
    assert "gs://" in error_lines(capsys.readouterr().err)[0]
    assert server.requests == []


def test_no_host_outside_a_cluster(package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("submit", "--package", str(package), "--param", "epochs=1") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "KFP_HOST" in line
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert kfp_api.resolve_host(None, pod) == kfp_api.IN_CLUSTER_HOST
    with pytest.raises(pkg.SubmitError, match="bad host"):
        kfp_api.resolve_host("localhost:8080", {})


@pytest.mark.parametrize(
    ("cron", "kfp_cron"),
    [
        ("0 3 * * 0", "0 0 3 * * 0"),
        ("  0   3 * *   sun ", "0 0 3 * * sun"),
        ("*/15 * * * *", "0 */15 * * * *"),
        ("30 2 1-7 JAN,jul mon-fri", "0 30 2 1-7 JAN,jul mon-fri"),
        ("0 0 3 * * 0", "0 0 3 * * 0"),
        ("0 0 9 ? * 2-6", "0 0 9 ? * 2-6"),
        ("5/10 0 3 * * *", "5/10 0 3 * * *"),
        ("@weekly", "@weekly"),
        ("@every 6h30m", "@every 6h30m"),
    ],
)
def test_cron_to_kfp(cron: str, kfp_cron: str) -> None:
    """robfig/cron v1.2.0's Parse (the KFP API server's check: backend/src/apiserver/server/
    api_converter.go, toModelJob, tag 2.17.0) wants six fields, seconds first."""
    assert cron_module.to_kfp_cron(cron) == kfp_cron


@pytest.mark.parametrize(
    ("cron", "expected"),
    [
        ("", "empty cron"),
        ("0 3 * *", "4 fields"),
        ("0 0 0 3 * * 0", "7 fields"),
        ("0 24 * * *", "out of range"),
        ("0 3 0 * *", "out of range"),
        ("0 3 * 13 *", "out of range"),
        ("0 3 * * L", "not acceptable"),
        ("*/0 * * * *", "step '0'"),
        ("@sometimes", "invalid cron expression '@sometimes'"),
    ],
)
def test_bad_cron(cron: str, expected: str) -> None:
    with pytest.raises(pkg.SubmitError, match=expected) as caught:
        cron_module.to_kfp_cron(cron)
    assert '"0 3 * * 0"' in str(caught.value)  # the hint


# --------------------------------------------------------------------------- (un)schedule


def test_schedule_sends_6_field_cron_and_replaces_existing(
    server: FakeKfpServer, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = server.add_recurring_run("car-classifier-retrain")
    other = server.add_recurring_run("someone-elses-job")
    args = [
        "schedule",
        "--host",
        server.url,
        "--package",
        str(package),
        "--cron",
        "0 3 * * 0",
        "--param",
        "epochs=5",
        "--pipeline-root",
        "gs://b/root",
    ]
    assert run_cli(*args) == 0
    out = capsys.readouterr().out

    assert [r.path for r in server.requests if r.method == "DELETE"] == [
        f"/apis/v2beta1/recurringruns/{old}"
    ]
    (create,) = posts(server, "/recurringruns")
    body = create.json
    assert body["display_name"] == "car-classifier-retrain"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}}
    assert int(body["max_concurrency"]) == 1
    assert body["mode"] == "ENABLE"
    assert body["no_catchup"] is True
    assert body["runtime_config"] == {"parameters": {"epochs": 5}, "pipeline_root": "gs://b/root"}
    pipeline_id = next(iter(server.pipelines))
    assert body["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": server.versions[pipeline_id][-1]["pipeline_version_id"],
    }
    assert body["experiment_id"] == next(iter(server.experiments))
    new_id = next(i for i in server.recurring_runs if i != other)
    assert f"recurring run id: {new_id}" in out
    assert f"{server.url}/#/recurringrun/details/{new_id}" in out
    assert "0 0 3 * * 0" in out

    # idempotent: scheduling again leaves exactly one schedule of that name, on the same version
    assert run_cli(*args) == 0
    names = sorted(r["display_name"] for r in server.recurring_runs.values())
    assert names == ["car-classifier-retrain", "someone-elses-job"]
    assert len(posts(server, "/pipelines/upload_version")) == 1


def test_schedule_rejects_bad_cron_before_any_request(
    server: FakeKfpServer, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["schedule", "--host", server.url, "--package", str(package), "--param", "epochs=1"]
    assert run_cli(*args, "--cron", "0 24 * * *") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "'0 24 * * *'" in line and '"0 3 * * 0"' in line
    assert run_cli(*args) == 2  # no --cron, no CRON
    assert "--cron" in error_lines(capsys.readouterr().err)[0]
    assert server.requests == []


def test_unschedule_deletes_every_page_and_says_when_none(
    package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeKfpServer(page_size_cap=1) as server:
        ids = {server.add_recurring_run("nightly") for _ in range(3)}
        keep = server.add_recurring_run("car-classifier-retrain")
        assert run_cli("unschedule", "--host", server.url, "--job-name", "nightly") == 0
        deleted = {r.path.rsplit("/", 1)[1] for r in server.requests if r.method == "DELETE"}
        assert deleted == ids
        assert list(server.recurring_runs) == [keep]
        assert "deleted recurring run nightly" in capsys.readouterr().out

        assert run_cli("unschedule", "--host", server.url, "--job-name", "nightly") == 0
        assert "no recurring run named nightly" in capsys.readouterr().out


# ------------------------------------------------------------------------ failures, bounded


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_module(*argv: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KFP_", "KF_PIPELINES_"))}
    env["HOME"] = str(tmp_path)  # no ~/.config/kfp/context.json
    env.pop("KUBERNETES_SERVICE_HOST", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, time.monotonic() - start


def test_unreachable_host_is_one_line_exit_2(package: Path, tmp_path: Path) -> None:
    host = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    proc, seconds = _run_module(
        "submit",
        "--host",
        host,
        "--package",
        str(package),
        "--param",
        "epochs=1",
        tmp_path=tmp_path,
    )
    assert proc.returncode == 2
    assert seconds < 15
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach Kubeflow Pipelines at " + host)
    assert "--host" in line


def test_rejected_credentials_are_one_line_exit_2(package: Path, tmp_path: Path) -> None:
    with FakeKfpServer(required_token="right") as server:
        proc, seconds = _run_module(
            "schedule",
            "--host",
            server.url,
            "--package",
            str(package),
            "--param",
            "epochs=1",
            "--cron",
            "0 3 * * 0",
            "--existing-token",
            "wrong",
            tmp_path=tmp_path,
        )
        assert [r.path for r in server.requests] == ["/apis/v2beta1/healthz"]  # one try only
    assert proc.returncode == 2
    assert seconds < 15
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {server.url} rejected the credentials (HTTP 401")
    assert "--existing-token" in line and "--cookies" in line


def test_login_redirect_is_an_auth_error(package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeKfpServer(login_redirect=True) as server:
        assert run_cli(*submit_args(server, package, "--param", "epochs=1")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "text/html" in line and "login page" in line and "--cookies" in line


def test_https_to_a_plain_http_server(
    server: FakeKfpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("unschedule", "--host", server.url.replace("http:", "https:")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: TLS with https://127.0.0.1") and "http://" in line


def test_silent_server_times_out(package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        host = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        rc = run_cli("unschedule", "--host", host, "--timeout", "0.5", environ={})
        seconds = time.monotonic() - start
    assert rc == 2
    assert seconds < 5
    (line,) = error_lines(capsys.readouterr().err)
    assert "did not answer in time" in line and "--timeout" in line


# ------------------------------------------------------------------ identity (defect 4)


def test_runs_and_schedules_name_the_pipeline_service_account(
    server: FakeKfpServer, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a service account the API server runs the pods as its
    DEFAULTPIPELINERUNNERSERVICEACCOUNT (kubeflow/pipelines backend/src/apiserver/template/
    template.go, setDefaultServiceAccount, tag 2.17.0): ``pipeline-runner`` standalone,
    ``default-editor`` multi-user (manifests/kustomize/base/installs/multi-user/api-service/
    params.env, tag 2.4.0), which no Workload Identity binding of ours covers. So submit and
    schedule send manifests/serviceaccounts.yaml's account unless told another."""
    assert run_cli(*submit_args(server, package, "--param", "epochs=1")) == 0
    assert "pods run in namespace kubeflow as service account carclassifier-pipeline" in (
        capsys.readouterr().err
    )
    environ = {"KFP_SERVICE_ACCOUNT": "team-sa"}
    assert run_cli(*submit_args(server, package, "--param", "epochs=1"), environ=environ) == 0
    schedule = ["schedule", "--host", server.url, "--package", str(package), "--cron", "0 3 * * 0"]
    assert run_cli(*schedule, "--param", "epochs=1", "--service-account", "other-sa") == 0
    runs = [r.json["service_account"] for r in posts(server, "/runs")]
    assert runs == ["carclassifier-pipeline", "team-sa"]
    assert posts(server, "/recurringruns")[0].json["service_account"] == "other-sa"


def test_multi_user_pods_run_in_the_profile_namespace(
    package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A multi-user run goes to its experiment's namespace, the profile (kubeflow/pipelines
    backend/src/apiserver/resource/resource_manager.go, CreateRun, tag 2.17.0)."""
    with FakeKfpServer(multi_user=True) as server:
        args = submit_args(server, package, "--param", "epochs=1", "--namespace", "team-a")
        assert run_cli(*args) == 0
    err = capsys.readouterr().err
    assert "multi-user (profile namespace) Kubeflow Pipelines: pods run in namespace team-a" in err


# ------------------------------------------------------------------ resume (defect 5)


def test_resume_starts_the_identical_run_again(
    server: FakeKfpServer, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Argo's default retry policy (retryStrategy without retryPolicy, as KFP's argocompiler
    writes it) is OnFailure: a pod that is deleted or loses its node ends as an Error node and
    is not retried (argoproj/argo-workflows workflow/controller/operator.go, processNodeRetries
    and "pod deleted"; pkg/apis/workflow/v1alpha1/workflow_types.go, RetryPolicyActual; tag
    v4.0.5, the controller KFP 2.17.0 deploys). The run fails; resume starts it again with the
    same pipeline version, parameters, root, account and experiment (read with GET /runs/{id},
    backend/api/v2beta1/run.proto, tag 2.17.0), so finished tasks are cache hits."""
    args = submit_args(server, package, "--pipeline-root", "gs://b/root", "--param", "epochs=4")
    assert run_cli(*args, "--param", "tag=x7", "--service-account", "sa-1") == 0
    (old_id,) = server.runs
    capsys.readouterr()

    assert run_cli("resume", "--host", server.url, "--run-id", old_id) == 2
    assert "is PENDING: only a FAILED or CANCELED run" in capsys.readouterr().err

    server.runs[old_id]["state"] = "FAILED"
    assert run_cli("resume", "--host", server.url, environ={"RUN_ID": old_id}) == 0
    assert f"run {old_id} (FAILED) resumed" in capsys.readouterr().err
    first, again = (r.json for r in posts(server, "/runs"))
    for key in ("experiment_id", "pipeline_version_reference", "runtime_config", "service_account"):
        assert again[key] == first[key], key
    assert again["runtime_config"] == {
        "parameters": {"epochs": 4, "tag": "x7"},
        "pipeline_root": "gs://b/root",
    }
    assert again["display_name"].startswith(first["display_name"] + "-resume-")
    assert len(posts(server, "/pipelines/upload_version")) == 1  # nothing uploaded again

    assert run_cli("resume", "--host", server.url) == 2
    assert "--run-id" in error_lines(capsys.readouterr().err)[0]


# ------------------------------------------------------- defaults on a cluster (defect 3)

GOOD_IMAGE = "registry.example.com/carclassifier/trainer:1.0"


@pytest.fixture(scope="module")
def car_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real car-classifier pipeline (recipe_b6), compiled on a pushed-looking image."""
    from pipelines.car_classifier import compile_pipeline

    out = tmp_path_factory.mktemp("car") / "car_classifier.yaml"
    return compile_pipeline(REPO / "configs/recipe_b6.yaml", out, GOOD_IMAGE)


def test_placeholder_image_is_refused(
    server: FakeKfpServer, car_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The executors' images (deploymentSpec.executors.*.container.image) are what the pods
    pull; components/_base.py's DEFAULT_IMAGE is a placeholder no registry has."""
    from components import DEFAULT_IMAGE

    placeholder = tmp_path / "placeholder.yaml"
    placeholder.write_text(car_package.read_text().replace(GOOD_IMAGE, DEFAULT_IMAGE))
    args = ["--pipeline-root", "gs://my-bucket/kfp", "--param", "data_source=gs://my-bucket/cars"]
    assert run_cli(*submit_args(server, placeholder, *args)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert DEFAULT_IMAGE in line and "make push-image" in line
    assert server.requests == []


def test_empty_data_source_is_refused_unless_the_recipe_has_a_gs_root(
    server: FakeKfpServer, car_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """data_source="" means the recipe's data.root (recipe_b6: a relative folder no image has:
    prepare would fail on every retry)."""
    root = ["--pipeline-root", "gs://my-bucket/kfp"]
    assert run_cli(*submit_args(server, car_package, *root)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "data_source is empty" in line and "data/sf-dl-car-classification" in line
    assert "data_source=gs://" in line
    assert server.requests == []
    in_recipe = ["--param", "overrides=[data.root=gs://my-bucket/cars]"]
    assert run_cli(*submit_args(server, car_package, *root, *in_recipe)) == 0


def test_checkpoint_root_defaults_under_the_pipeline_root(
    server: FakeKfpServer, car_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """checkpoint_root="" would keep checkpoints inside each pod (no resume; the gate cannot
    read another pod's export): derived as <pipeline root>/checkpoints, else refused."""
    data = ["--param", "data_source=gs://my-bucket/cars"]
    assert run_cli(*submit_args(server, car_package, *data)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "checkpoint_root is empty" in line and "--pipeline-root" in line
    assert (
        run_cli(*submit_args(server, car_package, *data, "--pipeline-root", "gs://my-bucket/kfp/"))
        == 0
    )
    (run,) = posts(server, "/runs")
    assert run.json["runtime_config"]["parameters"] == {
        "data_source": "gs://my-bucket/cars",
        "checkpoint_root": "gs://my-bucket/kfp/checkpoints",
    }
    given = [
        "--param",
        "checkpoint_root=gs://other-bucket/ckpt",
        "--pipeline-root",
        "gs://my-bucket/kfp",
    ]
    assert run_cli(*submit_args(server, car_package, *data, *given)) == 0
    params = posts(server, "/runs")[1].json["runtime_config"]["parameters"]
    assert params["checkpoint_root"] == "gs://other-bucket/ckpt"


def test_make_targets_call_the_one_entry_point() -> None:
    """``make resume-pipeline RUN_ID=...``, ``make preflight`` and the others run
    ``python -m pipelines <command>`` (dry run: nothing is executed)."""
    commands = {
        "resume-pipeline": '-m pipelines resume --run-id "run-123"',
        "preflight": "-m pipelines preflight --package pipelines/compiled/car_classifier.yaml",
        "submit-pipeline": "-m pipelines submit --package pipelines/compiled/car_classifier.yaml",
        "unschedule": "-m pipelines unschedule",
    }
    for target, expected in commands.items():
        proc = subprocess.run(
            ["make", "-n", target, "RUN_ID=run-123"], cwd=REPO, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout, (target, proc.stdout)


def test_kaggle_data_is_refused_for_a_backend_without_optional_secrets(
    server: FakeKfpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A package for KFP 2.2.0 leaves the optional Kaggle env secret out (``optional`` of
    ``secretAsEnv`` is honoured from 2.15.0: src/carclassifier/kubeflow/kfp_versions.py, from
    kubernetes_platform/proto/kubernetes_executor_config.proto at the tags), so prepare would
    find no credentials: data_source=kaggle is refused at submit, a gs:// source is not."""
    from pipelines.car_classifier import compile_pipeline

    old = compile_pipeline(
        REPO / "configs/recipe_b6.yaml", tmp_path / "p.yaml", GOOD_IMAGE, kfp_version="2.2.0"
    )
    root = ["--pipeline-root", "gs://my-bucket/kfp"]
    assert run_cli(*submit_args(server, old, *root, "--param", "data_source=kaggle")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "data_source=kaggle" in line and "2.2.0" in line and "data_source=gs://" in line
    assert server.requests == []
    assert (
        run_cli(*submit_args(server, old, *root, "--param", "data_source=gs://my-bucket/cars")) == 0
    )
