"""Image folders packed into a few tar shards, and unpacked again, byte for byte.

The KFP launcher copies an input artifact into each pod with one object-store GET per object
(and uploads an output with one PUT per file), so an artifact of 20,000 images costs 20,000
round trips in every task that reads it. Packed into shards of ``shard_bytes`` each, the same
images are a handful of objects (see docs/data-handoff.md for the upstream code and the
measurements).

A shard is a plain, uncompressed POSIX tar (JPEGs do not compress). Its bytes depend only on
the relative paths and contents of the files: members in sorted path order, mtime 0, owner 0,
modes 0644/0755, so the same input gives the same shards and the same SHA-256s. ``index.json``
beside the shards lists them with their size and SHA-256; `extract_shards` checks both, and a
truncated or altered shard is a `DatasetError` that names the shard and what to do.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from carclassifier.errors import DatasetError
from carclassifier.storage import sha256_file

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FORMAT = "carclassifier-tar-shards/1"
DEFAULT_SHARD_BYTES = 256 * 2**20
"""Target size of one shard: ~1.5 GB of images make 6 shards, the demo data one."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Shard:
    """One tar file of the set: its name (beside ``index.json``), members, size and SHA-256."""

    name: str
    members: int
    bytes: int
    sha256: str


def _entries(root: Path, folders: Sequence[str]) -> list[tuple[str, Path]]:
    """(archive name, path) of every folder and file under ``root/<folder>``, sorted by name."""
    found: list[tuple[str, Path]] = []
    for folder in folders:
        top = root / folder
        if not top.is_dir():
            raise DatasetError(f"{top} is not a folder: nothing to pack")
        found.append((folder, top))
        for path in top.rglob("*"):
            if not (path.is_dir() or path.is_file()):
                raise DatasetError(f"{path} is neither a file nor a folder; remove it")
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _tar_info(name: str, path: Path) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if path.is_dir():
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.type, info.mode, info.size = tarfile.REGTYPE, 0o644, path.stat().st_size
    return info


def _groups(entries: list[tuple[str, Path]], shard_bytes: int) -> list[list[tuple[str, Path]]]:
    """Consecutive runs of entries of about ``shard_bytes`` each (a larger file: its own)."""
    groups: list[list[tuple[str, Path]]] = [[]]
    size = 0
    for entry in entries:
        cost = 512 + (0 if entry[1].is_dir() else -(-entry[1].stat().st_size // 512) * 512)
        if groups[-1] and size + cost > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += cost
    return groups


def write_shards(
    root: str | os.PathLike[str],
    folders: Sequence[str],
    out_dir: str | os.PathLike[str],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Shard]:
    """Pack everything under ``root/<folder>`` (for each of ``folders``) into
    ``out_dir/images-NNNNN.tar`` shards of about ``shard_bytes`` and write ``out_dir/index.json``.
    Archive names are relative to ``root``, so `extract_shards` recreates the same folders."""
    root, out = Path(root), Path(out_dir)
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, group in enumerate(_groups(_entries(root, folders), shard_bytes)):
        name = f"images-{number:05d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.PAX_FORMAT) as tar:
            for arcname, path in group:
                info = _tar_info(arcname, path)
                if info.isdir():
                    tar.addfile(info)
                else:
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
        shards.append(Shard(name, len(group), (out / name).stat().st_size, sha256_file(out / name)))
    index = {"format": FORMAT, "shards": [asdict(s) for s in shards]}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    log.info("packed %d entries of %s into %d shard(s) in %s (%.1f MB)",
             sum(s.members for s in shards), ", ".join(folders), len(shards), out,
             sum(s.bytes for s in shards) / 2**20)  # fmt: skip
    return shards


def read_index(shard_dir: str | os.PathLike[str]) -> list[Shard]:
    """The shards listed in ``shard_dir/index.json``."""
    path = Path(shard_dir) / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT!r}")
        return [Shard(**s) for s in index["shards"]]
    except FileNotFoundError:
        raise DatasetError(
            f"{path} does not exist: this Dataset artifact has no image shards; "
            "re-run the prepare step"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"{path} is not a shard index ({exc}); re-run the prepare step"
        ) from None


def index_digest(shard_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of ``index.json``: one value that names the exact images of a shard set."""
    return sha256_file(Path(shard_dir) / INDEX_FILE)


class _HashingReader(io.RawIOBase):
    """A read-only file that hashes and counts what is read through it."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.handle.read(len(buffer))
        self.digest.update(data)
        self.count += len(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to the end (tar padding after the last member) so the digest covers all."""
        while self.read(_CHUNK):
            pass


def _bad(path: Path, why: str) -> DatasetError:
    return DatasetError(
        f"image shard {path} is {why}: the Dataset artifact is damaged; re-run the prepare "
        "step without cache (kfp: enable_caching=False) to write it again"
    )


_DATA_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
"""tarfile's ``data`` filter where this Python has it (3.11.4+); Debian bookworm's 3.11.2, the
interpreter of the stand-in image base, has none: `_members` then is the only guard."""


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Plain files and folders with relative names inside the destination, else `TarError`
    (the guard of the ``data`` filter, also on Pythons without it)."""
    for member in tar:
        if not (member.isfile() or member.isdir()):
            raise tarfile.TarError(f"member {member.name!r} is neither a file nor a folder")
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or member.name.startswith("\\"):
            raise tarfile.TarError(f"member {member.name!r} points outside the destination")
        yield member


def extract_shards(shard_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Unpack every shard of ``shard_dir/index.json`` into ``dest`` (created), checking each
    shard's size before and its SHA-256 while it is read (one pass). Returns ``dest``.

    Raises `DatasetError` naming the shard when one is missing, of the wrong size, altered or
    not a tar; ``dest`` is then removed, so nothing half-extracted is used."""
    shard_dir, dest = Path(shard_dir), Path(dest)
    shards = read_index(shard_dir)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        for shard in shards:
            path = shard_dir / shard.name
            if not path.is_file():
                raise _bad(path, "missing")
            size = path.stat().st_size
            if size != shard.bytes:
                raise _bad(path, f"{size} bytes, but index.json says {shard.bytes} (truncated?)")
            with open(path, "rb") as handle:
                reader = _HashingReader(handle)
                try:
                    with tarfile.open(fileobj=reader, mode="r|") as tar:
                        for member in _members(tar):
                            tar.extract(member, dest, **_DATA_FILTER)
                except (tarfile.TarError, OSError, EOFError) as exc:
                    raise _bad(path, f"not a readable tar ({exc})") from None
                reader.drain()
            if reader.digest.hexdigest() != shard.sha256:
                raise _bad(path, "altered (its SHA-256 differs from index.json)")
    except DatasetError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    log.info("unpacked %d shard(s), %d entries, from %s into %s",
             len(shards), sum(s.members for s in shards), shard_dir, dest)  # fmt: skip
    return dest
