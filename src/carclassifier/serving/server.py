"""Run the app under waitress: listen at once, load the model in the background.

``/healthz`` answers from the first moment; ``/readyz`` turns 200 once the model is loaded. A
model that cannot be loaded stops the server with that error (the CLI prints it in one line).

``--model`` may be a serving root (`carclassifier.deploy`: numbered versions and the
``champion.json`` pointer). The server then serves the version the pointer names and checks the
pointer every ``poll_seconds``: a new version is loaded in the background, checked on the photo
stored with it (`carclassifier.deploy.check_version`) and only then swapped in, in one
assignment; a request already running finishes on the model it started with, so none fails.
A version that fails to load or its check is logged and not served; the old one stays.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading

from PIL import Image
from waitress.server import create_server

from carclassifier import deploy, storage
from carclassifier.errors import CarClassifierError, StorageError
from carclassifier.serving.app import ModelSlot, create_app
from carclassifier.serving.config import ServingConfig
from carclassifier.serving.predictor import Predictor

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised in the main thread by the SIGTERM handler: leave the serving loop."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signum)


def is_serving_root(uri: str) -> bool:
    """True when ``uri`` holds a ``champion.json`` pointer (a serving root, not an export)."""
    return storage.exists(storage.join(uri, deploy.POINTER_FILE))


def load_version(folder: str, backend: str) -> Predictor:
    """Load a published version and check it on its stored photo (`StorageError` if it fails)."""
    predictor = Predictor.load(folder, backend)
    problem = deploy.check_version(predictor, folder)
    if problem:
        raise StorageError(f"version {folder} is not served: {problem}")
    return predictor


class VersionWatcher(threading.Thread):
    """Follows a serving root's pointer: loads, checks and swaps in each new live version."""

    def __init__(self, slot: ModelSlot, config: ServingConfig, version: int | None) -> None:
        super().__init__(name="version-watcher", daemon=True)
        self.slot, self.config, self.version = slot, config, version
        self.stopped = threading.Event()
        self._refused: int | None = None

    def poll(self) -> None:
        """One look at the pointer; switch when it names another (loadable, checked) version."""
        live = deploy.pointer_version(self.config.model)
        if live is None or live[0] in (self.version, self._refused):
            return
        number, folder = live
        log.info("version %d is live at %s: loading it", number, folder)
        try:
            predictor = load_version(folder, self.config.backend)
        except Exception as exc:  # noqa: BLE001 - any load failure: keep serving the old model
            self._refused = number
            log.error("keeping version %s: %s", self.version, exc)
            return
        self.slot.set(predictor)
        log.info(
            "switched from version %s to %d (%s backend)", self.version, number, predictor.backend
        )
        self.version = number

    def run(self) -> None:
        while not self.stopped.wait(self.config.poll_seconds):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: try again next time
                log.warning("could not read the pointer of %s: %s", self.config.model, exc)


def _load_into(
    slot: ModelSlot, config: ServingConfig, failed: list[BaseException], by_signal: bool
) -> None:
    try:
        if is_serving_root(config.model):
            live = deploy.pointer_version(config.model)
            assert live is not None
            predictor = load_version(live[1], config.backend)
            slot.set(predictor)
            VersionWatcher(slot, config, live[0]).start()
            log.info(
                "ready: serving version %d of %s (%s backend)",
                live[0],
                config.model,
                predictor.backend,
            )
            return
        predictor = Predictor.load(config.model, config.backend)
        slot.set(predictor)
        log.info("ready: serving %s (%s backend)", config.model, predictor.backend)
    except BaseException as exc:  # reported by serve() in the main thread
        failed.append(exc)
        slot.error = f"the model could not be loaded: {exc}"
        if by_signal:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            _thread.interrupt_main()


def serve(config: ServingConfig) -> None:
    """Serve ``config.model`` on ``config.host:config.port`` until interrupted."""
    log.info("model %s, backend %s", config.model, config.backend)
    # Pillow's own decompression-bomb guard at the same limit as decode_image's header check
    # (process-wide, so set here in the server process rather than in create_app).
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    slot = ModelSlot()
    app = create_app(config, slot)
    server = create_server(
        app,
        host=config.host,
        port=config.port,
        threads=config.threads,
        max_request_body_size=config.max_upload_bytes + 1024 * 1024,  # multipart overhead
        ident="carclassifier",
        clear_untrusted_proxy_headers=True,
    )
    failed: list[BaseException] = []
    # SIGTERM (Kubernetes stopping the pod, or the loader failing) leaves the loop cleanly.
    in_main = threading.current_thread() is threading.main_thread()
    loader = threading.Thread(target=_load_into, args=(slot, config, failed, in_main), daemon=True)
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_stop) if in_main else None
        loader.start()
        log.info("listening on http://%s:%s/", server.effective_host, server.effective_port)
        server.run()
    except (_Stop, KeyboardInterrupt):
        loader.join(timeout=5)
        if not failed:
            log.info("stopped")
            return
    finally:
        server.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    exc = failed[0]
    if isinstance(exc, CarClassifierError):
        raise exc
    raise StorageError(f"cannot load the model {config.model}: {exc}") from exc
