"""Run the app under waitress: listen at once, load the model in the background.

``/healthz`` answers from the first moment; ``/readyz`` turns 200 once the model is loaded. A
model that cannot be loaded stops the server with that error (the CLI prints it in one line).
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading

from PIL import Image
from waitress.server import create_server

from carclassifier.errors import CarClassifierError, StorageError
from carclassifier.serving.app import ModelSlot, create_app
from carclassifier.serving.config import ServingConfig
from carclassifier.serving.predictor import Predictor

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised in the main thread by the SIGTERM handler: leave the serving loop."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signum)


def _load_into(
    slot: ModelSlot, config: ServingConfig, failed: list[BaseException], by_signal: bool
) -> None:
    try:
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
