"""One way to read files from a local path or a ``gs://`` URI.

Later stages write checkpoints through this module too; for now it fetches inputs (weights
files, datasets) so that callers never string-build URIs or branch on the scheme themselves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from carclassifier.errors import StorageError

log = logging.getLogger(__name__)

GCS_SCHEME = "gs://"


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


def gcs_client():  # noqa: ANN201 - google.cloud.storage.Client, imported lazily
    """A google-cloud-storage client; honours ``STORAGE_EMULATOR_HOST`` for local tests."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="test", credentials=AnonymousCredentials())
    return storage.Client()


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
    from google.api_core import exceptions as gexc

    try:
        log.info("downloading %s -> %s", uri, target)
        gcs_client().bucket(bucket_name).blob(blob_name).download_to_filename(str(tmp))
    except gexc.NotFound as exc:
        raise StorageError(f"{uri} not found: check the bucket and object name") from exc
    except gexc.Forbidden as exc:
        raise StorageError(
            f"no permission to read {uri}: give the service account storage.objects.get"
        ) from exc
    os.replace(tmp, target)
    return target


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


def _blob(uri: str):  # noqa: ANN202 - google.cloud.storage.Blob
    bucket, name = split_gcs_uri(uri)
    return gcs_client().bucket(bucket).blob(name)


def exists(uri: str) -> bool:
    """True when a file (or, for GCS, an object) exists at ``uri``."""
    if is_gcs_uri(uri):
        return _blob(uri).exists()
    return Path(uri).is_file()


def read_text(uri: str) -> str | None:
    """The text at ``uri``, or None when there is none."""
    if is_gcs_uri(uri):
        from google.api_core import exceptions as gexc

        try:
            return _blob(uri).download_as_text()
        except gexc.NotFound:
            return None
    path = Path(uri)
    return path.read_text(encoding="utf-8") if path.is_file() else None


def write_text(uri: str, text: str) -> None:
    """Write ``text`` to ``uri`` atomically."""
    if is_gcs_uri(uri):
        _blob(uri).upload_from_string(text, content_type="application/json")
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def put_file(local: str | os.PathLike[str], uri: str) -> None:
    """Copy a local file to ``uri`` (streamed; large files upload in resumable chunks)."""
    if is_gcs_uri(uri):
        blob = _blob(uri)
        blob.chunk_size = 32 * 1024 * 1024
        blob.upload_from_filename(str(local))
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(local).resolve() == target.resolve():
        return
    tmp = target.with_name(target.name + ".partial")
    shutil.copyfile(local, tmp)
    os.replace(tmp, target)


def get_file(uri: str, local: str | os.PathLike[str]) -> Path:
    """Copy the file at ``uri`` to ``local`` (streamed, via a temporary name)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + ".partial")
    if is_gcs_uri(uri):
        from google.api_core import exceptions as gexc

        try:
            _blob(uri).download_to_filename(str(tmp))
        except gexc.NotFound:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"{uri} not found") from None
    else:
        if not Path(uri).is_file():
            raise StorageError(f"{uri} does not exist")
        shutil.copyfile(uri, tmp)
    os.replace(tmp, local)
    return local


def delete_tree(uri: str) -> None:
    """Remove a local folder or every object under a gs:// prefix (missing is fine)."""
    if is_gcs_uri(uri):
        bucket, prefix = split_gcs_uri(uri.rstrip("/") + "/")
        for blob in gcs_client().list_blobs(bucket, prefix=prefix):
            blob.delete()
        return
    shutil.rmtree(uri, ignore_errors=True)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    blobs = [b for b in gcs_client().list_blobs(bucket, prefix=prefix) if not b.name.endswith("/")]
    if not blobs:
        raise StorageError(f"nothing under {uri}: check the bucket and prefix")
    for blob in blobs:
        target = local_dir / blob.name[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
    log.info("downloaded %d files from %s to %s", len(blobs), uri, local_dir)
    return local_dir


def upload_tree(local_dir: str | os.PathLike[str], uri: str) -> None:
    """Copy every file under ``local_dir`` to the same relative names under ``uri``."""
    local_dir = Path(local_dir)
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        put_file(path, join(uri, path.relative_to(local_dir).as_posix()))
