"""One way to read files from a local path or a ``gs://`` URI.

Later stages write checkpoints through this module too; for now it fetches inputs (weights
files, datasets) so that callers never string-build URIs or branch on the scheme themselves.
"""

from __future__ import annotations

import hashlib
import logging
import os
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
