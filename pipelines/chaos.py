"""Chaos runs of the local pipeline: a seeded fault schedule kills the tasks' processes and the
pipeline's own retries resume them (issue #15, item 4).

What is the real backend and what is the harness:

* **Retries are kfp.local's own.** kfp 2.17.3 retries a failed task as the compiled
  ``set_retry`` policy says: ``kfp/local/orchestrator/task_executor.py``,
  ``execute_single_task`` (``for attempt in range(max_retries + 1)`` with the policy's backoff),
  called by the DAG orchestrators for every task. A retried task gets the same command and the
  same task folder, like a new pod of an Argo retry. The harness only shortens the backoff
  (`chaos_options`: 1 s, factor 1) and gives each task enough retries for its scheduled faults.
* **The process launch is wrapped.** kfp.local starts every task with
  ``kfp.local.subprocess_task_handler.run_local_subprocess(full_command, env_vars)``; while a
  chaos run is on, `Supervisor.run_local_subprocess` takes its place: it starts the *same*
  command with the same environment (in its own process group, as a container's processes are),
  streams its output as kfp does, and kills it as the schedule says — the role of the kubelet
  preempting a pod. It never relaunches anything itself: its exit status goes back to kfp,
  which decides on the retry.
* **Uploads are tapped.** With ``STORAGE_EMULATOR_HOST`` set, the tasks talk to the GCS
  emulator through `UploadTap`, a forwarding proxy that holds an upload request matching a
  fault, kills the task while its upload is in flight, then drops the request (SIGKILL: the
  object is never stored) or forwards it (SIGTERM: an upload under way finishes).

Fault kinds: ``sigkill`` (SIGKILL to the task's process group) and ``sigterm`` (SIGTERM, then
SIGKILL to whatever is left after ``grace_seconds``, Kubernetes' termination grace period).
Triggers: ``after_seconds`` into the attempt, a line of the task's output (``on_line``, a
regex; the stages log one per mid-epoch checkpoint, so ``<stage> epoch E step S/`` is a point
in training, ``<stage> epoch E/`` its end) plus ``delay_seconds``, or an upload whose object
name matches ``on_upload``.

Not the real backend: no pods, images, node pools or pod rescheduling; SIGTERM goes to the
component's Python process (as Kubernetes sends it to the container's main process), SIGKILL to
the whole group; a time or line trigger that comes after its attempt ended is reported as
*missed*, not injected. docs/reliability.md (fault 8) has the figures of ``make chaos-run``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from carclassifier.config import RunConfig, load_config
from carclassifier.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("sigkill", "sigterm")
TASKS_AFTER_STAGES = ("evaluate-model", "predict-submission", "export-model", "champion-gate")
"""Tasks of every run after the stages (deploy-model runs only when the gate promotes)."""
CHAOS_SETTINGS = (
    "name=chaos",
    "model.weights=null",
    "input.image_size=32",
    "input.batch_size=4",
    "augment.tta_views=2",
    "evaluate.robustness.enabled=false",
    "checkpoint.every=1",
    "stages=[{name: stage_1, description: head only, epochs: 2, unfreeze: 0.0, "
    "learning_rate: 0.01}, {name: stage_2, description: all layers, epochs: 2, unfreeze: 1.0, "
    "learning_rate: 0.001}]",
)
"""The small recipe of a chaos run (Lite0 from random weights at 32 px, two 2-epoch stages, a
checkpoint every step so that a kill anywhere resumes at a step); ``--set`` changes it."""
RTOL, ATOL = 1e-5, 1e-6
"""Final weights must agree with the uninterrupted run's as in tests/test_preemption.py."""


def stage_task_names(config: RunConfig) -> list[str]:
    """kfp's task names of the stages: ``train-stage``, ``train-stage-2``, ..."""
    return ["train-stage" if i == 0 else f"train-stage-{i + 1}" for i in range(len(config.stages))]


def task_names(config: RunConfig) -> list[str]:
    """Every task a first run of the pipeline runs (the gate promotes, so deploy runs too)."""
    return ["prepare-data", "validate-and-eda", *stage_task_names(config), *TASKS_AFTER_STAGES,
            "deploy-model", "run-summary"]  # fmt: skip


@dataclass(frozen=True)
class Fault:
    """One kill: of attempt ``attempt`` of task ``task``, by ``kind``, at one trigger."""

    task: str
    kind: str = "sigkill"
    attempt: int = 1
    after_seconds: float | None = None
    on_line: str | None = None
    on_upload: str | None = None
    delay_seconds: float = 0.0
    grace_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"fault kind {self.kind!r} is not one of {list(KINDS)}")
        triggers = [t for t in (self.after_seconds, self.on_line, self.on_upload) if t is not None]
        if len(triggers) != 1:
            raise ConfigError(
                f"fault on {self.task} needs exactly one of after_seconds, on_line, on_upload"
            )
        if self.attempt < 1 or self.grace_seconds < 0 or self.delay_seconds < 0:
            raise ConfigError(f"fault on {self.task}: attempt >= 1, grace and delay >= 0")
        for pattern in (self.on_line, self.on_upload):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(
                        f"fault on {self.task}: bad regex {pattern!r}: {exc}"
                    ) from None

    @property
    def trigger(self) -> str:
        """``time``, ``line`` or ``upload``."""
        if self.after_seconds is not None:
            return "time"
        return "line" if self.on_line is not None else "upload"

    def describe(self) -> str:
        """One line, e.g. ``sigkill of train-stage attempt 1 during upload ~model.keras``."""
        if self.after_seconds is not None:
            where = f"{self.after_seconds:.1f}s in"
        elif self.on_line is not None:
            where = f"{self.delay_seconds:.1f}s after a line ~{self.on_line!r}"
        else:
            where = f"during an upload ~{self.on_upload!r}"
        return f"{self.kind} of {self.task} attempt {self.attempt} {where}"


@dataclass(frozen=True)
class FaultSchedule:
    """The faults of a chaos run (at most one per task attempt)."""

    faults: tuple[Fault, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        seen = [(f.task, f.attempt) for f in self.faults]
        if len(seen) != len(set(seen)):
            raise ConfigError("a fault schedule has at most one fault per task attempt")

    def retries_needed(self) -> int:
        """The most faults any one task gets (its retries must be at least this)."""
        counts: dict[str, int] = {}
        for fault in self.faults:
            counts[fault.task] = max(counts.get(fault.task, 0), fault.attempt)
        return max(counts.values(), default=0)

    @classmethod
    def random(
        cls,
        faults: int,
        seed: int,
        config: RunConfig,
        max_per_task: int = 3,
        grace_seconds: float = 3.0,
    ) -> FaultSchedule:
        """``faults`` seeded faults over the tasks of ``config``'s pipeline: half at random on
        the stages (a random step, a random checkpoint upload, or a random time), the rest on
        the other tasks (a random time or one of their uploads); SIGKILL or SIGTERM alike."""
        rng = random.Random(seed)
        stages = dict(zip(stage_task_names(config), config.stages, strict=True))
        others = [t for t in task_names(config) if t not in stages]
        uploads = {"prepare-data": r"/dataset\.json$", "evaluate-model": r"/evaluation/",
                   "export-model": r"/export/", "champion-gate": r"champion\.json$",
                   "deploy-model": r"/serving/", "run-summary": r"/summary\.json$",
                   "predict-submission": r"submission"}  # fmt: skip
        room = {t: max_per_task for t in [*stages, *others]}
        if faults > sum(room.values()):
            raise ConfigError(f"{faults} faults: at most {sum(room.values())} for this recipe")
        chosen: list[Fault] = []
        for _ in range(faults):
            pool = [t for t in stages if room[t]] if rng.random() < 0.5 else []
            pool = pool or [t for t in room if room[t]]
            task = rng.choice(pool)
            attempt = max_per_task - room[task] + 1
            room[task] -= 1
            kind = rng.choice(KINDS)
            common = {
                "task": task,
                "kind": kind,
                "attempt": attempt,
                "grace_seconds": grace_seconds,
            }
            trigger = rng.choice(("time", "point", "upload"))
            if task in stages:
                stage = stages[task]
                epoch = rng.randint(1, stage.epochs)
                if trigger == "point":
                    # after the first mid-epoch checkpoint of the epoch, or after its end
                    point = rng.choice((" step 1/", "/"))
                    chosen.append(Fault(**common, on_line=rf"{stage.name} epoch {epoch}{point}",
                                        delay_seconds=round(rng.uniform(0.0, 1.0), 2)))  # fmt: skip
                elif trigger == "upload":
                    leaf = rng.choice(("model.keras", "state.json", "checkpoint.json"))
                    chosen.append(Fault(**common, on_upload=(
                        rf"stages/{stage.name}/checkpoints/epoch-{epoch:04d}[^/]*/{re.escape(leaf)}$"
                    )))  # fmt: skip
                else:
                    chosen.append(Fault(**common, after_seconds=round(rng.uniform(2.0, 10.0), 2)))
            elif trigger == "upload" and task in uploads:
                chosen.append(Fault(**common, on_upload=uploads[task]))
            else:
                chosen.append(Fault(**common, after_seconds=round(rng.uniform(1.0, 8.0), 2)))
        return cls(tuple(chosen), seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (`from_dict` reads it back)."""
        return {"seed": self.seed, "faults": [asdict(f) for f in self.faults]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultSchedule:
        """The schedule `to_dict` wrote."""
        return cls(tuple(Fault(**f) for f in data.get("faults", [])), data.get("seed"))


@dataclass
class FaultEvent:
    """What happened to one scheduled fault."""

    fault: Fault
    injected: bool = False
    at_seconds: float | None = None
    """Seconds into the attempt when the signal was sent."""
    detail: str = ""
    """The line or upload object name that triggered it."""
    exit_status: int | None = None
    """The killed attempt's exit status (-9: SIGKILL; 143: stopped by SIGTERM in time)."""
    stopped_in_grace: bool | None = None
    """sigterm only: the task's processes were gone before the grace period ended."""
    survived: bool = False
    """A later attempt of the task succeeded."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "fault": asdict(self.fault), "describe": self.fault.describe()}


@dataclass
class _Attempt:
    task: str
    number: int
    process: subprocess.Popen
    started: float
    fault: Fault | None
    event: FaultEvent | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    kill_thread: threading.Thread | None = None


def _task_name(full_command: Sequence[str]) -> str:
    """The kfp task a command runs: its ``executor_output.json`` sits in ``<run>/<task>/``."""
    for i, part in enumerate(full_command[:-1]):
        if part == "--executor_input":
            executor_input = json.loads(full_command[i + 1])
            return Path(executor_input["outputs"]["outputFile"]).parent.name
    return "unknown"


def _group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process is in process group ``pgid`` (Linux /proc)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _wait_group(pgid: int, seconds: float) -> bool:
    """Wait up to ``seconds`` for group ``pgid`` to end; True when it did."""
    deadline = time.monotonic() + seconds
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _executor_pids(pgid: int) -> list[int]:
    """The component's Python processes in group ``pgid`` (``kfp.dsl.executor_main``)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                command = fh.read()
            if os.getpgid(int(entry.name)) == pgid and b"kfp.dsl.executor_main" in command:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class Supervisor:
    """Stands in for ``kfp.local.subprocess_task_handler.run_local_subprocess`` and kills task
    attempts as ``schedule`` says (see the module docstring)."""

    def __init__(self, schedule: FaultSchedule) -> None:
        self.schedule = schedule
        self.events = [FaultEvent(f) for f in schedule.faults]
        self.attempts: list[dict[str, Any]] = []
        """Every attempt: task, attempt number, exit status, seconds."""
        self._counts: dict[str, int] = {}
        self._running: list[_Attempt] = []
        self._lock = threading.Lock()

    # -- called by kfp.local, one task at a time (the DAG runs tasks in turn)
    def run_local_subprocess(
        self, full_command: list[str], env_vars: dict[str, str] | None = None
    ) -> int:
        """Start ``full_command`` as kfp.local would, inject the fault scheduled for this
        attempt, and return the exit status (negative: killed by that signal)."""
        task = _task_name(full_command)
        with self._lock:
            number = self._counts[task] = self._counts.get(task, 0) + 1
        event = next(
            (e for e in self.events if (e.fault.task, e.fault.attempt) == (task, number)), None
        )
        env = {**os.environ, **env_vars} if env_vars else None
        process = subprocess.Popen(
            full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=env, start_new_session=True,
        )  # fmt: skip
        attempt = _Attempt(task, number, process, time.monotonic(), event and event.fault, event)
        with self._lock:
            self._running.append(attempt)
        timer = None
        if attempt.fault is not None and attempt.fault.after_seconds is not None:
            timer = threading.Timer(attempt.fault.after_seconds, self._inject, (attempt, "timer"))
            timer.daemon = True
            timer.start()
        pattern = (
            re.compile(attempt.fault.on_line) if attempt.fault and attempt.fault.on_line else None
        )
        assert process.stdout is not None
        for line in iter(process.stdout.readline, ""):
            print(line, end="")
            if pattern is not None and pattern.search(line):
                pattern = None
                self._inject_later(attempt, attempt.fault.delay_seconds, line.strip())
        print("\n")
        status = process.wait()
        attempt.done.set()
        if timer is not None:
            timer.cancel()
        with attempt.lock:
            killer = attempt.kill_thread
        if killer is not None:
            killer.join()
        _killpg(process.pid, signal.SIGKILL)  # nothing of an ended attempt outlives it
        _wait_group(process.pid, 30)
        with self._lock:
            self._running.remove(attempt)
            self.attempts.append({"task": task, "attempt": number, "exit_status": status,
                                  "seconds": round(time.monotonic() - attempt.started, 2)})  # fmt: skip
        if event is not None and event.injected:
            event.exit_status = status
        log.info("chaos: %s attempt %d ended with exit status %d", task, number, status)
        return status

    # -- the tap's hook, from its request threads
    def on_upload(self, name: str) -> bool:
        """An upload of object ``name`` is starting: kill the attempt whose fault it matches.
        Returns False when the request must be dropped (the process was SIGKILLed)."""
        with self._lock:
            running = list(self._running)
        for attempt in running:
            fault = attempt.fault
            if fault is not None and fault.on_upload and re.search(fault.on_upload, name):
                if self._inject(attempt, name):
                    return fault.kind != "sigkill"
        return True

    def _inject_later(self, attempt: _Attempt, delay: float, detail: str) -> None:
        if delay <= 0:
            self._inject(attempt, detail)
            return
        timer = threading.Timer(delay, self._inject, (attempt, detail))
        timer.daemon = True
        timer.start()

    def _inject(self, attempt: _Attempt, detail: str) -> bool:
        """Send the attempt's fault now unless it ended or was already hit; True when sent."""
        fault, event = attempt.fault, attempt.event
        assert fault is not None and event is not None
        pgid = attempt.process.pid
        with attempt.lock:
            if event.injected or attempt.done.is_set() or attempt.process.poll() is not None:
                return False
            event.injected = True
            event.at_seconds = round(time.monotonic() - attempt.started, 2)
            event.detail = detail
            log.warning("chaos: %s (%s)", fault.describe(), detail)
            if fault.kind == "sigkill":
                _killpg(pgid, signal.SIGKILL)
                return True
            # SIGTERM goes to the component's process, as the kubelet's goes to the container's
            # main process; the shell around it waits for its exit status
            for pid in _executor_pids(pgid) or [pgid]:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

            def grace() -> None:
                event.stopped_in_grace = _wait_group(pgid, fault.grace_seconds)
                _killpg(pgid, signal.SIGKILL)

            attempt.kill_thread = threading.Thread(target=grace, daemon=True)
            attempt.kill_thread.start()
        return True

    def settle(self) -> None:
        """Mark each injected fault survived when a later attempt of its task exited 0."""
        for event in self.events:
            event.survived = event.injected and any(
                a["task"] == event.fault.task and a["attempt"] > event.fault.attempt
                and a["exit_status"] == 0 for a in self.attempts
            )  # fmt: skip


def _object_name(method: str, path: str, body: bytes) -> str | None:
    """The object an upload request writes (JSON API media/multipart/resumable start), else
    None."""
    parts = urlsplit(path)
    if method != "POST" or not parts.path.startswith("/upload/storage/v1/b/"):
        return None
    query = parse_qs(parts.query)
    if "upload_id" in query:
        return None  # a resumable upload's data, after the start already seen
    if "name" in query:
        return unquote(query["name"][0])
    found = re.search(rb'"name":\s*"([^"]+)"', body[:4096])
    return found.group(1).decode() if found else ""


def forward(
    handler: BaseHTTPRequestHandler,
    upstream: SplitResult,
    body: bytes,
    timeout: float = 120,
    upstream_host: bool = True,
) -> tuple[int, list[tuple[str, str]], bytes] | None:
    """Send ``handler``'s request (its method, path, headers and ``body``) to ``upstream`` and
    read the answer: (status, headers, payload), or None when the upstream could not be reached
    (the handler's connection is then closed). ``upstream_host``: send the upstream's own Host
    (gcp-storage-emulator writes it into the links it returns: mediaLink, resumable sessions),
    else the client's, so that the links lead back through the proxy."""
    conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=timeout)
    drop = ("connection", "host") if upstream_host else ("connection",)
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in drop}
    if upstream_host:
        headers["Host"] = upstream.netloc
    try:
        conn.request(handler.command, handler.path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    except OSError:
        handler.close_connection = True
        return None
    finally:
        conn.close()


def answer(
    handler: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], payload: bytes
) -> None:
    """Send a forwarded answer to ``handler``'s client (hop-by-hop headers left out, the
    length set again; no body for HEAD; a client that hung up is let go)."""
    handler.send_response(status)
    for key, value in headers:
        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    if handler.command != "HEAD":
        try:
            handler.wfile.write(payload)
        except OSError:
            pass


class UploadTap:
    """A forwarding proxy to the GCS emulator at ``upstream`` that calls ``hook(name)`` before
    forwarding each upload; the request is dropped when the hook returns False. A context
    manager; ``url`` is its endpoint."""

    def __init__(self, upstream: str, hook: Any) -> None:
        self.upstream = urlsplit(upstream)
        self.uploads: list[str] = []
        tap = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                name = _object_name(self.command, self.path, body)
                if name is not None:
                    tap.uploads.append(name)
                    if not hook(name):
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                # later requests follow the emulator's links directly, not through the tap
                reply = forward(self, tap.upstream, body)
                if reply is not None:
                    answer(self, *reply)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # killed clients hang up mid-request

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> UploadTap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def gcs_emulator() -> Iterator[str]:
    """A gcp-storage-emulator (the dev extra) on 127.0.0.1 in its own process, in memory;
    sets ``STORAGE_EMULATOR_HOST`` while it runs. Yields its URL."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
               "--port", str(port), "--in-memory"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b?project=test", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise ConfigError(
                    "gcp-storage-emulator did not start: install the dev extras "
                    "(pip install -e '.[dev]') or set STORAGE_EMULATOR_HOST"
                ) from None
            time.sleep(0.2)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    try:
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


@dataclass
class ChaosReport:
    """The outcome of a chaos run."""

    status: str
    """kfp.local's: SUCCESS or FAILURE."""
    wall_seconds: float
    run: Path | None
    """The run's task folder under the pipeline root."""
    events: list[FaultEvent]
    attempts: list[dict[str, Any]]
    uploads_seen: int
    schedule: FaultSchedule

    @property
    def injected(self) -> list[FaultEvent]:
        """The faults that hit a live attempt."""
        return [e for e in self.events if e.injected]

    @property
    def survived(self) -> list[FaultEvent]:
        """Injected faults whose task later succeeded."""
        return [e for e in self.events if e.survived]

    def counts(self) -> dict[str, dict[str, int]]:
        """Scheduled / injected / survived / missed, per kind and per trigger, and in all."""
        table: dict[str, dict[str, int]] = {}
        for event in self.events:
            for key in ("all", event.fault.kind, f"trigger:{event.fault.trigger}"):
                row = table.setdefault(key, dict.fromkeys(("scheduled", "injected", "survived",
                                                            "missed"), 0))  # fmt: skip
                row["scheduled"] += 1
                row["injected"] += event.injected
                row["survived"] += event.survived
                row["missed"] += not event.injected
        return table

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "status": self.status, "wall_seconds": self.wall_seconds,
            "run": str(self.run) if self.run else None, "counts": self.counts(),
            "events": [e.to_dict() for e in self.events], "attempts": self.attempts,
            "uploads_seen": self.uploads_seen, "schedule": self.schedule.to_dict(),
        }  # fmt: skip


def chaos_options(schedule: FaultSchedule) -> Any:
    """`ClusterOptions` of a chaos run: retries enough for the schedule (at least the default
    3), 1 s backoff without growth (the cluster's 60 s x 2^n would only add waiting)."""
    from pipelines.car_classifier import ClusterOptions

    return ClusterOptions(
        retries=max(3, schedule.retries_needed()), backoff_duration="1s", backoff_factor=1.0
    )


def run_chaos(
    config: RunConfig,
    pipeline_root: str | Path,
    schedule: FaultSchedule,
    **arguments: object,
) -> ChaosReport:
    """Run the pipeline with kfp.local (`pipelines.car_classifier.run_pipeline_local`) while
    `Supervisor` injects ``schedule``'s faults; uploads are tapped when
    ``STORAGE_EMULATOR_HOST`` is set. An empty schedule is an uninterrupted run through the
    same harness. ``arguments`` are pipeline parameters."""
    from kfp.local import subprocess_task_handler

    from pipelines.car_classifier import pipeline_name, run_pipeline_local

    supervisor = Supervisor(schedule)
    root = Path(pipeline_root)
    before = set(root.glob(f"{pipeline_name(config)}-*"))
    original = subprocess_task_handler.run_local_subprocess
    upstream = os.environ.get("STORAGE_EMULATOR_HOST")
    tap = UploadTap(upstream, supervisor.on_upload) if upstream else None
    status = "SUCCESS"
    started = time.monotonic()
    subprocess_task_handler.run_local_subprocess = supervisor.run_local_subprocess
    try:
        if tap is not None:
            tap.__enter__()
            os.environ["STORAGE_EMULATOR_HOST"] = tap.url
        try:
            run_pipeline_local(config, root, options=chaos_options(schedule), **arguments)
        except RuntimeError as exc:  # kfp.local: "Pipeline ... finished with status FAILURE"
            if "finished with status" not in str(exc):
                raise
            status = "FAILURE"
            log.error("chaos: %s", exc)
    finally:
        subprocess_task_handler.run_local_subprocess = original
        if tap is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = upstream or ""
            tap.__exit__()
    supervisor.settle()
    if status != "SUCCESS":
        for event in supervisor.events:
            event.survived = False
    after = set(root.glob(f"{pipeline_name(config)}-*")) - before
    return ChaosReport(
        status=status,
        wall_seconds=round(time.monotonic() - started, 1),
        run=next(iter(after), None),
        events=supervisor.events,
        attempts=supervisor.attempts,
        uploads_seen=len(tap.uploads) if tap else 0,
        schedule=schedule,
    )


def final_model_uri(config: RunConfig, checkpoint_root: str, run_key: str) -> str:
    """The last stage's best model under ``checkpoint_root`` (what evaluate/export read)."""
    from carclassifier import storage
    from carclassifier.artifacts import run_dir
    from carclassifier.stages import stage_dir

    folder = run_dir(checkpoint_root, run_key, config)
    return storage.join(stage_dir(folder, config.stages[-1].name), "best.keras")


def weights_difference(first: str, second: str) -> float:
    """Largest absolute difference between the weights of two ``.keras`` models (local or
    gs://); raises `AssertionError` when they differ beyond rtol 1e-5 / atol 1e-6."""
    import tempfile

    import keras
    import numpy as np

    from carclassifier import storage

    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for i, uri in enumerate((first, second)):
            local = storage.get_file(uri, Path(tmp) / f"{i}.keras")
            models.append(keras.models.load_model(local, compile=False).get_weights())
    a, b = models
    assert len(a) == len(b), f"{first} has {len(a)} weight arrays, {second} {len(b)}"
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)
    return max((float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True)), default=0.0)


def steps_reference(run: Path, config: RunConfig, out: str | Path) -> str:
    """Train the stages again, uninterrupted and in this process, with the same step function
    the stage tasks call (`carclassifier.steps.train_stage_step`), from the chaos run's Dataset
    artifact, into ``out``. Returns the last stage's model file."""
    from carclassifier import steps

    dataset = run / "prepare-data" / "dataset"
    run_key = run_key_of(run)
    out = Path(out)
    init = None
    for stage in config.stages:
        model = out / f"{stage.name}.keras"
        steps.train_stage_step(str(dataset), stage.name, str(out / "checkpoints"), run_key, init,
                               str(model), str(out / f"{stage.name}.html"))  # fmt: skip
        init = str(model)
    return str(init)


def run_key_of(run: Path) -> str:
    """The run key the prepare task put out."""
    output = json.loads((run / "prepare-data" / "executor_output.json").read_text())
    return output["parameterValues"]["run_key"]


def chaos_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """``path`` (a recipe YAML) with ``overrides``, else `CHAOS_SETTINGS` with them."""
    if path is None:
        return load_config(None, [*CHAOS_SETTINGS, *overrides])
    return load_config(path, list(overrides))


def main_chaos(
    config: RunConfig,
    root: Path,
    faults: int,
    seed: int,
    data: str | None = None,
    reference: str = "steps",
    grace_seconds: float = 3.0,
) -> tuple[ChaosReport, dict[str, Any]]:
    """``python -m pipelines chaos``: a seeded schedule of ``faults`` on the pipeline of
    ``config`` (checkpoints on the GCS emulator, started here unless ``STORAGE_EMULATOR_HOST``
    is set), then the uninterrupted reference (``steps``: the stages retrained in this process
    from the run's Dataset artifact; ``pipeline``: a whole run without faults; ``none``) and the
    comparison of the final weights. Returns the report and a summary dict."""
    import uuid
    from contextlib import nullcontext

    from carclassifier import storage
    from carclassifier.demo_data import generate_synthetic_dataset

    if reference not in ("steps", "pipeline", "none"):
        raise ConfigError(f"reference {reference!r} is not steps, pipeline or none")
    root.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = str(generate_synthetic_dataset(root / "data", classes=3, per_class=6, size=64))
    schedule = FaultSchedule.random(faults, seed, config, grace_seconds=grace_seconds)
    for fault in schedule.faults:
        log.info("chaos schedule: %s", fault.describe())
    emulator = nullcontext() if os.environ.get("STORAGE_EMULATOR_HOST") else gcs_emulator()
    with emulator:
        bucket = storage.gcs_client().create_bucket(f"chaos-{uuid.uuid4().hex[:8]}").name
        checkpoints = f"gs://{bucket}/runs"
        report = run_chaos(config, root / "kfp", schedule, data_source=data,
                           checkpoint_root=checkpoints)  # fmt: skip
        succeeded = {a["task"] for a in report.attempts if a["exit_status"] == 0}
        summary: dict[str, Any] = {
            "reference": reference,
            "weights_equal": None,
            "tasks_not_succeeded": [t for t in task_names(config) if t not in succeeded],
        }
        if report.status == "SUCCESS" and report.run is not None and reference != "none":
            run_key = run_key_of(report.run)
            final = final_model_uri(config, checkpoints, run_key)
            if reference == "steps":
                expected = steps_reference(report.run, config, root / "reference")
            else:
                started = time.monotonic()
                uninterrupted = run_chaos(config, root / "kfp", FaultSchedule(), data_source=data,
                                          checkpoint_root=f"gs://{bucket}/reference")  # fmt: skip
                summary["reference_wall_seconds"] = round(time.monotonic() - started, 1)
                done = {a["task"] for a in uninterrupted.attempts if a["exit_status"] == 0}
                summary["reference_tasks_not_succeeded"] = [
                    t for t in task_names(config) if t not in done
                ]
                if uninterrupted.status != "SUCCESS":
                    raise ConfigError("the uninterrupted reference run failed: see its log")
                expected = final_model_uri(config, f"gs://{bucket}/reference", run_key)
            try:
                summary["max_weight_difference"] = weights_difference(final, expected)
                summary["weights_equal"] = True
            except AssertionError as exc:
                summary["weights_equal"] = False
                summary["weights_mismatch"] = str(exc).strip().splitlines()[:6]
            text = storage.read_text(storage.join(checkpoints, run_key, "summary.json"))
            summary["run_summary_status"] = json.loads(text)["status"] if text else None
    return report, summary
