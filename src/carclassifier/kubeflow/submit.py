"""``submit``, ``schedule``, ``unschedule`` and ``resume`` of the compiled pipeline on KFP.

* ``submit`` uploads the package as a pipeline (first time) or a new version of it (skipped
  when a version of that name exists: the default name holds the package's SHA-256), gets or
  creates the experiment and starts a run as the run's service account.
* ``schedule`` does the same upload, creates the recurring run (cron, max concurrency 1, no
  catch-up) and then deletes the older ones of the job name, so one schedule is left.
* ``unschedule`` deletes the recurring run(s) of the job name.
* ``resume --run-id ID`` starts the identical run again: same pipeline version, parameters,
  pipeline root, service account and experiment, read from the old run (kfp.Client.get_run).
  Finished tasks are cache hits and an interrupted stage resumes from its checkpoints.

Every option has an environment variable (an empty value counts as unset), so the Makefile
passes its variables straight through. Failures end in ONE ``error: ...`` line, exit 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from carclassifier.kubeflow.cluster import (
    DEFAULT_SERVICE_ACCOUNT,
    STANDALONE_NAMESPACE,
    describe_placement,
    run_namespace,
)
from carclassifier.kubeflow.cron import CRON_HINT, to_kfp_cron
from carclassifier.kubeflow.kfp_api import (
    DEFAULT_TIMEOUT_S,
    IN_CLUSTER_HOST,
    ConnectionOptions,
    KfpConnection,
    PipelineVersionRef,
    connect,
    ensure_experiment,
    ensure_pipeline_version,
    find_recurring_runs,
    kfp_session,
    note,
)
from carclassifier.kubeflow.package import (
    PipelinePackage,
    SubmitError,
    check_pipeline_root,
    default_version_name,
    load_package,
    run_parameters,
)

DEFAULT_PACKAGE = "pipelines/compiled/car_classifier.yaml"
DEFAULT_PIPELINE_NAME = "car-classifier"
DEFAULT_EXPERIMENT = "carclassifier"
DEFAULT_JOB_NAME = "car-classifier-retrain"
#: Run states a resume may follow (backend/api/v2beta1/run.proto, RuntimeState, tag 2.17.0).
RESUMABLE_STATES = ("FAILED", "CANCELED")


@dataclass(frozen=True)
class PipelineOptions:
    """What to upload and how to run it."""

    package: str = DEFAULT_PACKAGE
    pipeline_name: str = DEFAULT_PIPELINE_NAME
    version: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    pipeline_root: str | None = None
    params: tuple[str, ...] = field(default_factory=tuple)
    service_account: str = DEFAULT_SERVICE_ACCOUNT


@dataclass(frozen=True)
class Started:
    """A created run or recurring run."""

    id: str
    url: str
    version: PipelineVersionRef | None = None
    replaced: tuple[str, ...] = ()


def _prepare(pipeline: PipelineOptions) -> tuple[PipelinePackage, dict[str, Any], str | None]:
    """Everything checkable offline, before any network call."""
    package = load_package(pipeline.package)
    root = check_pipeline_root(pipeline.pipeline_root)
    return package, run_parameters(package, pipeline.params, root), root


def _upload(conn: KfpConnection, package: PipelinePackage, pipeline: PipelineOptions):
    version = pipeline.version or default_version_name(pipeline.pipeline_name, package)
    ref = ensure_pipeline_version(conn, package, pipeline.pipeline_name, version)
    namespace = run_namespace(conn.multi_user, conn.namespace, STANDALONE_NAMESPACE)
    note(describe_placement(conn.multi_user, namespace, pipeline.service_account))
    return ref, ensure_experiment(conn, pipeline.experiment)


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")


def submit_pipeline(
    connection: ConnectionOptions,
    pipeline: PipelineOptions,
    run_name: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Started:
    """Upload (if needed) and start one run."""
    package, params, root = _prepare(pipeline)
    with kfp_session():
        conn = connect(connection, environ)
        ref, experiment_id = _upload(conn, package, pipeline)
        run = conn.client.run_pipeline(
            experiment_id=experiment_id,
            job_name=run_name or f"{pipeline.pipeline_name}-{_stamp()}",
            params=params,
            pipeline_id=ref.pipeline_id,
            version_id=ref.version_id,
            pipeline_root=root,
            service_account=pipeline.service_account,
        )
    return Started(str(run.run_id), f"{conn.ui_host}/#/runs/details/{run.run_id}", ref)


def resume_run(
    connection: ConnectionOptions,
    run_id: str,
    run_name: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Started:
    """Start the run ``run_id`` again, identically (see the module docstring)."""
    with kfp_session():
        conn = connect(connection, environ)
        old = conn.client.get_run(run_id)
        state = str(old.state or "")
        if state not in RESUMABLE_STATES:
            raise SubmitError(
                f"run {run_id} is {state or 'in an unknown state'}: only a FAILED or CANCELED run "
                "is resumed (terminate a stuck one first in the KFP UI)"
            )
        ref = old.pipeline_version_reference
        if ref is None or not ref.pipeline_version_id:
            raise SubmitError(
                f"run {run_id} has no pipeline version (an inline spec): submit again"
            )
        runtime = old.runtime_config
        run = conn.client.run_pipeline(
            experiment_id=old.experiment_id,
            job_name=run_name or f"{old.display_name}-resume-{_stamp()}",
            params=dict((runtime.parameters if runtime else None) or {}),
            pipeline_id=ref.pipeline_id,
            version_id=ref.pipeline_version_id,
            pipeline_root=(runtime.pipeline_root if runtime else None) or None,
            service_account=old.service_account or None,
        )
    note(f"run {run_id} ({state}) resumed: finished tasks come from the cache")
    return Started(str(run.run_id), f"{conn.ui_host}/#/runs/details/{run.run_id}")


def schedule_pipeline(
    connection: ConnectionOptions,
    pipeline: PipelineOptions,
    cron: str,
    job_name: str = DEFAULT_JOB_NAME,
    environ: Mapping[str, str] = os.environ,
) -> Started:
    """Upload (if needed), create the recurring run ``job_name`` on ``cron``, then delete the
    older ones of that name (a cron the server rejects leaves the old schedule in place)."""
    kfp_cron = to_kfp_cron(cron)
    package, params, root = _prepare(pipeline)
    with kfp_session():
        conn = connect(connection, environ)
        ref, experiment_id = _upload(conn, package, pipeline)
        old = [str(rr.recurring_run_id) for rr in find_recurring_runs(conn, job_name)]
        recurring = conn.client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=job_name,
            description=f"{pipeline.pipeline_name} {ref.version_name} on cron {kfp_cron!r}",
            cron_expression=kfp_cron,
            max_concurrency=1,
            no_catchup=True,
            params=params,
            pipeline_id=ref.pipeline_id,
            version_id=ref.version_id,
            enabled=True,
            pipeline_root=root,
            service_account=pipeline.service_account,
        )
        for rr_id in old:
            conn.client.delete_recurring_run(rr_id)
            note(f"recurring run {job_name}: deleted the previous one (id {rr_id})")
    rr_id = str(recurring.recurring_run_id)
    return Started(rr_id, f"{conn.ui_host}/#/recurringrun/details/{rr_id}", ref, tuple(old))


def unschedule_pipeline(
    connection: ConnectionOptions, job_name: str = DEFAULT_JOB_NAME, environ=os.environ
) -> list[str]:
    """Delete every recurring run called ``job_name``; return their ids (empty: none found)."""
    with kfp_session():
        conn = connect(connection, environ)
        deleted = [str(rr.recurring_run_id) for rr in find_recurring_runs(conn, job_name)]
        for rr_id in deleted:
            conn.client.delete_recurring_run(rr_id)
    return deleted


# ------------------------------------------------------------------------------------- CLI


def env(environ: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    """``environ[name]`` unless empty or blank, else ``default``."""
    value = environ.get(name, "")
    return value if value.strip() else default


def connection_arguments(sub: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """``--host``, ``--namespace``, credentials and ``--timeout``."""
    group = sub.add_argument_group("connection")
    group.add_argument(
        "--host",
        default=env(environ, "KFP_HOST"),
        help=f"KFP API base URL, e.g. http://localhost:8080 (env KFP_HOST; in a pod {IN_CLUSTER_HOST})",
    )
    group.add_argument(
        "--namespace",
        default=env(environ, "KFP_NAMESPACE"),
        help="profile namespace for multi-user Kubeflow (env KFP_NAMESPACE)",
    )
    for flag, var, text in (
        ("--existing-token", "KFP_TOKEN", "bearer token sent as 'Authorization: Bearer ...'"),
        ("--cookies", "KFP_COOKIES", "Cookie header, e.g. 'authservice_session=...'"),
        ("--ui-host", "KFP_UI_HOST", "base URL of the KFP UI for printed links (default --host)"),
        ("--ssl-ca-cert", "KFP_SSL_CA_CERT", "CA bundle to verify an https host"),
    ):
        group.add_argument(flag, default=env(environ, var), help=f"{text} (env {var})")
    group.add_argument(
        "--timeout",
        type=float,
        default=env(environ, "KFP_TIMEOUT", str(DEFAULT_TIMEOUT_S)),
        help="seconds the first request may take (env KFP_TIMEOUT; default %(default)s)",
    )


def pipeline_arguments(sub: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """The package, its names on the server, the run's root, parameters and account."""
    group = sub.add_argument_group("pipeline")
    for flag, var, default, text in (
        ("--package", "PIPELINE_PACKAGE", DEFAULT_PACKAGE, "compiled pipeline YAML"),
        ("--pipeline-name", "PIPELINE_NAME", DEFAULT_PIPELINE_NAME, "pipeline name on the server"),
        ("--version", "PIPELINE_VERSION", None, "version name (default NAME-<sha256[:12]>)"),
        ("--experiment", "EXPERIMENT", DEFAULT_EXPERIMENT, "experiment, created if missing"),
        ("--pipeline-root", "PIPELINE_ROOT", None, "artifact root, e.g. gs://BUCKET/kfp-root"),
        ("--service-account", "KFP_SERVICE_ACCOUNT", DEFAULT_SERVICE_ACCOUNT, "the pods' account"),
    ):
        group.add_argument(flag, default=env(environ, var, default), help=f"{text} (env {var})")
    group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline parameter, repeatable; VALUE is a YAML scalar (3, 0.5, true, text)",
    )


def add_commands(commands: Any, environ: Mapping[str, str]) -> None:
    """The submit / schedule / unschedule / resume sub-commands of ``python -m pipelines``."""
    job_help = "recurring run name (env JOB_NAME; default %(default)s)"
    submit = commands.add_parser("submit", help="upload the package if needed and start a run")
    schedule = commands.add_parser("schedule", help="upload if needed and (re)create the schedule")
    unschedule = commands.add_parser("unschedule", help="delete the recurring run(s) of a name")
    resume = commands.add_parser("resume", help="start a failed run again, finding finished tasks")
    for sub in (submit, schedule, unschedule, resume):
        connection_arguments(sub, environ)
    for sub in (submit, schedule):
        pipeline_arguments(sub, environ)
    for sub in (schedule, unschedule):
        sub.add_argument(
            "--job-name", default=env(environ, "JOB_NAME", DEFAULT_JOB_NAME), help=job_help
        )
    for sub in (submit, resume):
        sub.add_argument("--run-name", help="run name (default NAME-<UTC time>)")
    schedule.add_argument(
        "--cron", default=env(environ, "CRON"), help=f"cron (env CRON): {CRON_HINT}"
    )
    resume.add_argument("--run-id", default=env(environ, "RUN_ID"), help="the run (env RUN_ID)")


def _connection(args: argparse.Namespace) -> ConnectionOptions:
    if not args.timeout > 0:
        raise SubmitError(f"bad --timeout {args.timeout}: must be a positive number of seconds")
    return ConnectionOptions(
        args.host, args.namespace, args.existing_token, args.cookies, args.ui_host,
        args.timeout, args.ssl_ca_cert,
    )  # fmt: skip


def _pipeline(args: argparse.Namespace) -> PipelineOptions:
    return PipelineOptions(
        args.package, args.pipeline_name, args.version, args.experiment, args.pipeline_root,
        tuple(args.param), args.service_account,
    )  # fmt: skip


def run_command(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> None:
    """Run the parsed sub-command; print what was created."""
    connection = _connection(args)
    if args.command == "submit":
        run = submit_pipeline(connection, _pipeline(args), args.run_name, environ)
        print(f"run id: {run.id}\nrun link: {run.url}", file=out)
    elif args.command == "resume":
        if not args.run_id:
            raise SubmitError(
                "no run to resume: pass --run-id ID (make resume-pipeline RUN_ID=...)"
            )
        run = resume_run(connection, args.run_id, args.run_name, environ)
        print(f"run id: {run.id}\nrun link: {run.url}", file=out)
    elif args.command == "schedule":
        if not args.cron:
            raise SubmitError(f"no schedule: pass --cron or set CRON; {CRON_HINT}")
        made = schedule_pipeline(connection, _pipeline(args), args.cron, args.job_name, environ)
        verb = "replaced" if made.replaced else "created"
        print(f"recurring run {args.job_name} {verb}: cron {to_kfp_cron(args.cron)!r}", file=out)
        print(f"recurring run id: {made.id}\nrecurring run link: {made.url}", file=out)
    else:
        deleted = unschedule_pipeline(connection, args.job_name, environ)
        if deleted:
            print(f"deleted recurring run {args.job_name}: {', '.join(deleted)}", file=out)
        else:
            print(f"no recurring run named {args.job_name}: nothing to delete", file=out)
