"""One way to read and write files at a local path or a ``gs://`` URI.

Inputs (weights, datasets), checkpoints and stage outputs all go through this module, so callers
never string-build URIs or branch on the scheme themselves.

GCS faults. Every request carries one retry policy (`gcs_retry`): google-cloud-storage's
``DEFAULT_RETRY`` predicate (HTTP 408/429/500/502/503/504, dropped connections, timeouts) with
exponential backoff, a per-request timeout (`gcs_timeout`) so that a stalled response becomes a
retried timeout, and an overall deadline; each retry is logged with the URI and attempt number.
The numbers come from the environment (`RETRY_*_ENV`, `TIMEOUT_ENV`) so tests can shrink them.
Conditional writes (``if_generation_match``) are retried too: a retry that finds its own earlier
attempt already stored is recognised by content. A permanent error (403, missing bucket, other
4xx) or a deadline spent on transient errors raises `StorageError` at once, naming the URI, what
went wrong and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs
from google.cloud.storage.retry import DEFAULT_RETRY

from carclassifier.errors import StorageError

log = logging.getLogger(__name__)

GCS_SCHEME = "gs://"
RETRY_DEADLINE_ENV = "CARCLASSIFIER_GCS_RETRY_DEADLINE"
"""Seconds one GCS call may spend retrying transient errors before giving up (default 300)."""
RETRY_INITIAL_ENV = "CARCLASSIFIER_GCS_RETRY_INITIAL"
"""First backoff delay in seconds (default 1; doubles each retry)."""
RETRY_MAX_ENV = "CARCLASSIFIER_GCS_RETRY_MAX"
"""Longest backoff delay in seconds (default 32)."""
TIMEOUT_ENV = "CARCLASSIFIER_GCS_TIMEOUT"
"""Seconds to wait for one HTTP response before the request counts as failed (default 120)."""


class PreconditionFailedError(StorageError):
    """A conditional write found the object changed by someone else."""


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise StorageError(f"{name}={value!r} is not a number of seconds") from None


def gcs_timeout() -> float:
    """Per-request timeout in seconds (`TIMEOUT_ENV`)."""
    return _env_float(TIMEOUT_ENV, 120.0)


def gcs_retry(what: str) -> Retry:
    """The retry policy of one GCS call: google-cloud-storage's retryable errors, exponential
    backoff between `RETRY_INITIAL_ENV` and `RETRY_MAX_ENV` seconds, `RETRY_DEADLINE_ENV` in all;
    logs each retry with ``what`` (e.g. "upload gs://b/x") and the attempt number."""
    attempts = itertools.count(1)

    def on_error(exc: Exception) -> None:
        log.warning("GCS %s: transient error (%s), retry attempt %d", what, _describe(exc),
                    next(attempts))  # fmt: skip

    return Retry(
        predicate=DEFAULT_RETRY._predicate,  # the library's own list of retryable errors
        initial=_env_float(RETRY_INITIAL_ENV, 1.0),
        maximum=_env_float(RETRY_MAX_ENV, 32.0),
        multiplier=2.0,
        timeout=_env_float(RETRY_DEADLINE_ENV, 300.0),
        on_error=on_error,
    )


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    response = getattr(exc, "response", None)  # google.resumable_media InvalidResponse
    if not isinstance(code, int) and isinstance(getattr(response, "status_code", None), int):
        code, text = response.status_code, getattr(response, "text", "") or text
    text = " ".join(str(text).split())[:200]
    return f"HTTP {int(code)}: {text}" if isinstance(code, int) else f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def _gcs_errors(action: str, uri: str) -> Iterator[None]:
    """Turn permanent GCS errors into a one-line `StorageError` (URI, cause, remedy)."""
    try:
        yield
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise StorageError(
            f"no permission to {action} {uri} ({_describe(exc)}): grant the service account "
            "access to the bucket (roles/storage.objectAdmin) or check the credentials"
        ) from exc
    except gexc.NotFound as exc:
        bucket = split_gcs_uri(uri)[0] if is_gcs_uri(uri) else uri
        raise StorageError(
            f"cannot {action} {uri}: not found ({_describe(exc)}); check that bucket "
            f"{bucket!r} exists and the object name is right"
        ) from exc
    except gexc.PreconditionFailed as exc:
        raise PreconditionFailedError(
            f"cannot {action} {uri}: it was changed by another writer ({_describe(exc)})"
        ) from exc
    except gexc.RetryError as exc:
        raise StorageError(
            f"gave up trying to {action} {uri}: transient errors did not stop within "
            f"{_env_float(RETRY_DEADLINE_ENV, 300.0):.0f} s (last: {_describe(exc.cause or exc)}); "
            f"check GCS status and the network, or raise {RETRY_DEADLINE_ENV}"
        ) from exc
    except gexc.GoogleAPICallError as exc:
        raise StorageError(f"GCS refused to {action} {uri} ({_describe(exc)})") from exc


def is_gcs_uri(uri: str | os.PathLike[str]) -> bool:
    """True when ``uri`` is a ``gs://bucket/object`` URI."""
    return str(uri).startswith(GCS_SCHEME)


def split_gcs_uri(uri: str) -> tuple[str, str]:
    """Split ``gs://bucket/a/b`` into ``("bucket", "a/b")``."""
    if not is_gcs_uri(uri):
        raise StorageError(f"{uri!r} is not a gs:// URI; write it as gs://<bucket>/<object>")
    bucket, _, blob = uri[len(GCS_SCHEME) :].partition("/")
    if not bucket or not blob:
        raise StorageError(f"{uri!r} names no object; write it as gs://<bucket>/<object>")
    return bucket, blob


def cache_dir() -> Path:
    """Where downloaded inputs are kept (``$CARCLASSIFIER_CACHE`` or ``~/.cache/carclassifier``)."""
    root = os.environ.get("CARCLASSIFIER_CACHE") or Path.home() / ".cache" / "carclassifier"
    return Path(root)


def gcs_client() -> gcs.Client:
    """A google-cloud-storage client; honours ``STORAGE_EMULATOR_HOST`` for local tests."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return gcs.Client(project="test", credentials=AnonymousCredentials())
    return gcs.Client()


def local_copy(uri: str | os.PathLike[str]) -> Path:
    """Return a local path holding the file at ``uri``.

    A local path is checked and returned as is; a ``gs://`` object is streamed to the cache
    (to a temporary name first, so a half-downloaded file is never taken for a whole one).
    """
    if not is_gcs_uri(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise StorageError(f"{path} does not exist; check the path or give a gs:// URI")
        return path
    bucket_name, blob_name = split_gcs_uri(str(uri))
    digest = hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    target = cache_dir() / "gcs" / digest / Path(blob_name).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    log.info("downloading %s -> %s", uri, target)
    _download(str(uri), tmp, f"{uri} not found: check the bucket and object name")
    os.replace(tmp, target)
    return target


def _download(uri: str, tmp: Path, not_found: str) -> None:
    """Stream the object at ``uri`` into ``tmp`` (retried; removed again on failure)."""
    try:
        with _gcs_errors("read", uri):
            _blob(uri).download_to_filename(
                str(tmp), retry=gcs_retry(f"download {uri}"), timeout=gcs_timeout()
            )
    except StorageError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc.__cause__, gexc.NotFound):
            raise StorageError(not_found) from None
        raise


# --------------------------------------------------------------------------- writing and listing
# Every location is a string: a local path or gs://bucket/prefix. Writers never leave a
# half-written file under its final name: locally a temporary name is renamed into place
# (os.replace is atomic); on GCS an object only appears once its upload completed.


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or a gs:// URI."""
    base = str(base)
    if is_gcs_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def _blob(uri: str) -> gcs.Blob:
    bucket, name = split_gcs_uri(uri)
    return gcs_client().bucket(bucket).blob(name)


def exists(uri: str) -> bool:
    """True when a file (or, for GCS, an object) exists at ``uri``."""
    if is_gcs_uri(uri):
        with _gcs_errors("look up", uri):
            return _blob(uri).exists(retry=gcs_retry(f"look up {uri}"), timeout=gcs_timeout())
    return Path(uri).is_file()


def read_text(uri: str) -> str | None:
    """The text at ``uri``, or None when there is none."""
    return read_versioned(uri)[0]


def read_versioned(uri: str) -> tuple[str | None, int | None]:
    """The text at ``uri`` and its GCS generation (None locally), or (None, None) when absent.

    The generation is what `write_text` takes as ``if_generation_match`` to replace exactly
    this version and no later one."""
    if not is_gcs_uri(uri):
        path = Path(uri)
        return (path.read_text(encoding="utf-8") if path.is_file() else None), None
    bucket, name = split_gcs_uri(uri)
    with _gcs_errors("read", uri):
        for _ in range(5):  # the object may be replaced between the two requests
            blob = (
                gcs_client()
                .bucket(bucket)
                .get_blob(name, retry=gcs_retry(f"look up {uri}"), timeout=gcs_timeout())
            )
            if blob is None:
                return None, None
            generation = int(blob.generation)
            try:
                text = blob.download_as_text(
                    if_generation_match=generation,
                    retry=gcs_retry(f"read {uri}"),
                    timeout=gcs_timeout(),
                )
            except (gexc.PreconditionFailed, gexc.NotFound):
                continue
            return text, generation
    raise StorageError(f"{uri} keeps changing while being read: is another run writing there?")


def write_text(uri: str, text: str, if_generation_match: int | None = None) -> None:
    """Write ``text`` to ``uri`` atomically.

    ``if_generation_match`` (gs:// only): replace the object only while its generation is this
    one (0: only create it), else raise `PreconditionFailedError`; locally it is not checked.
    """
    if is_gcs_uri(uri):
        _upload_text(uri, text, if_generation_match)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _upload_text(uri: str, text: str, if_generation_match: int | None) -> None:
    blob = _blob(uri)
    with _gcs_errors("write", uri):
        try:
            blob.upload_from_string(
                text,
                content_type="application/json",
                if_generation_match=if_generation_match,
                retry=gcs_retry(f"upload {uri}"),
                timeout=gcs_timeout(),
            )
        except gexc.PreconditionFailed:
            # A retried attempt whose first try was stored but whose answer was lost also
            # lands here: the object then holds exactly our text.
            if read_versioned(uri)[0] != text:
                raise


def create_text(uri: str, text: str) -> bool:
    """Create ``uri`` with ``text`` only if nothing is there (gs://: ``if_generation_match=0``;
    locally a hard link, which fails when the name exists). True when this call created it."""
    if is_gcs_uri(uri):
        try:
            _upload_text(uri, text, if_generation_match=0)
        except PreconditionFailedError:
            return False
        return True
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def put_file(local: str | os.PathLike[str], uri: str) -> None:
    """Copy a local file to ``uri`` (streamed; large files upload in resumable chunks)."""
    if is_gcs_uri(uri):
        blob = _blob(uri)
        blob.chunk_size = 32 * 1024 * 1024
        with _gcs_errors("write", uri):
            blob.upload_from_filename(
                str(local), retry=gcs_retry(f"upload {uri}"), timeout=gcs_timeout()
            )
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(local).resolve() == target.resolve():
        return
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.copyfile(local, tmp)
    os.replace(tmp, target)


def get_file(uri: str, local: str | os.PathLike[str]) -> Path:
    """Copy the file at ``uri`` to ``local`` (streamed, via a temporary name)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + ".partial")
    if is_gcs_uri(uri):
        _download(uri, tmp, f"{uri} not found")
    else:
        if not Path(uri).is_file():
            raise StorageError(f"{uri} does not exist")
        shutil.copyfile(uri, tmp)
    os.replace(tmp, local)
    return local


def list_names(uri: str) -> list[str]:
    """Names of the files and folders directly under a local folder or gs:// prefix."""
    if not is_gcs_uri(uri):
        path = Path(uri)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    bucket, prefix = split_gcs_uri(uri.rstrip("/") + "/")
    with _gcs_errors("list", uri):
        names = {
            blob.name[len(prefix) :].split("/", 1)[0]
            for blob in gcs_client().list_blobs(
                bucket, prefix=prefix, retry=gcs_retry(f"list {uri}"), timeout=gcs_timeout()
            )
        }
    return sorted(n for n in names if n)


def delete_tree(uri: str) -> None:
    """Remove a local folder or every object under a gs:// prefix (missing is fine)."""
    if is_gcs_uri(uri):
        bucket, prefix = split_gcs_uri(uri.rstrip("/") + "/")
        with _gcs_errors("delete", uri):
            for blob in gcs_client().list_blobs(
                bucket, prefix=prefix, retry=gcs_retry(f"list {uri}"), timeout=gcs_timeout()
            ):
                with contextlib.suppress(gexc.NotFound):  # a retried delete that got through
                    blob.delete(retry=gcs_retry(f"delete {uri}"), timeout=gcs_timeout())
        return
    shutil.rmtree(uri, ignore_errors=True)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_id(uri: str) -> str:
    """A content checksum of the file at ``uri`` (local: SHA-256; gs://: the stored CRC32C)."""
    if is_gcs_uri(uri):
        bucket, name = split_gcs_uri(uri)
        blob = (
            gcs_client()
            .bucket(bucket)
            .get_blob(name, retry=gcs_retry(f"look up {uri}"), timeout=gcs_timeout())
        )
        if blob is None:
            raise StorageError(f"{uri} not found: check the --init model URI")
        return f"crc32c:{blob.crc32c or blob.md5_hash or blob.size}"
    return f"sha256:{sha256_file(local_copy(uri))}"


def download_tree(uri: str, local_dir: str | os.PathLike[str]) -> Path:
    """Copy every file under a gs:// prefix (or a local folder) into ``local_dir``."""
    local_dir = Path(local_dir)
    if not is_gcs_uri(uri):
        source = Path(uri)
        if not source.is_dir():
            raise StorageError(f"{uri} is not a folder")
        shutil.copytree(source, local_dir, dirs_exist_ok=True)
        return local_dir
    bucket, prefix = split_gcs_uri(uri.rstrip("/") + "/")
    with _gcs_errors("list", uri):
        blobs = [
            b
            for b in gcs_client().list_blobs(
                bucket, prefix=prefix, retry=gcs_retry(f"list {uri}"), timeout=gcs_timeout()
            )
            if not b.name.endswith("/")
        ]
    if not blobs:
        raise StorageError(f"nothing under {uri}: check the bucket and prefix")
    for blob in blobs:
        target = local_dir / blob.name[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        source = f"gs://{bucket}/{blob.name}"
        with _gcs_errors("read", source):
            blob.download_to_filename(
                str(target), retry=gcs_retry(f"download {source}"), timeout=gcs_timeout()
            )
    log.info("downloaded %d files from %s to %s", len(blobs), uri, local_dir)
    return local_dir


def upload_tree(local_dir: str | os.PathLike[str], uri: str) -> None:
    """Copy every file under ``local_dir`` to the same relative names under ``uri``."""
    local_dir = Path(local_dir)
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        put_file(path, join(uri, path.relative_to(local_dir).as_posix()))
