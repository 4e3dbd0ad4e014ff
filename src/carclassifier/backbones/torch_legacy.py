"""Read a state dict saved in torch's legacy (pre-zip) format, without torch.

The legacy format is a run of pickles followed by raw storage bytes:

1. the magic number, 2. the protocol version (1001), 3. a sys-info dict (byte order), 4. the
state dict, whose tensors are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)`` calls with storages as persistent ids ``('storage', <XStorage>, key, location, numel,
view_metadata)``, 5. the list of storage keys; then, for each key in that order, an 8-byte
element count followed by the raw data.

Unpickling arbitrary data can run arbitrary code, so a restricted unpickler allows only the few
globals this format needs and refuses every other one. The result is bit-identical to
``torch.load``.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carclassifier.errors import BackboneError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype (byte order is added from the file's sys info).
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records where the tensor's data is."""
    if not isinstance(storage, _StorageRef):
        raise BackboneError("malformed torch file: a tensor without a storage")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: _TensorRef, requires_grad: bool = False, hooks: Any = None) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is just its tensor."""
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of a legacy torch state dict."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise BackboneError(
                f"refusing to unpickle {module}.{name}: a torch state dict file holds only "
                "tensors; this file is not one (or is not safe to read)"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise BackboneError(f"malformed torch file: unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise BackboneError(f"malformed torch file: {storage_type!r} is not a storage type")
        if view_metadata is not None:
            raise BackboneError("unsupported torch file: it uses storage views (torch < 0.4)")
        return _StorageRef(str(key), _STORAGE_DTYPES[storage_type.name], int(numel))


def _load_pickle(stream: io.BytesIO) -> Any:
    return _RestrictedUnpickler(stream).load()


def read_legacy_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a torch legacy-format ``.pth`` state dict into numpy arrays, without torch.

    Returns an ordered ``{name: array}`` dict in the file's order; each array is a C-contiguous
    copy in native byte order, bit-identical to what ``torch.load`` gives. Raises
    `BackboneError` for a zip-format or otherwise unreadable file, or for any pickled global
    other than the few a state dict needs (no other class is ever imported or called).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise BackboneError(f"cannot read torch weights {path}: {exc}") from exc
    if raw[:2] == b"PK":
        raise BackboneError(
            f"{path} is torch's zip format; only the legacy (pre-1.6) format is supported here"
        )
    stream = io.BytesIO(raw)
    try:
        magic = _load_pickle(stream)
        if magic != LEGACY_MAGIC_NUMBER:
            raise BackboneError(f"{path} is not a torch legacy file (bad magic number)")
        version = _load_pickle(stream)
        if version != LEGACY_PROTOCOL_VERSION:
            raise BackboneError(f"{path}: unsupported torch protocol version {version!r}")
        sys_info = _load_pickle(stream)
        byte_order = "<" if sys_info.get("little_endian", True) else ">"
        state = _load_pickle(stream)
        storage_keys = _load_pickle(stream)
    except BackboneError:
        raise
    except Exception as exc:  # truncated or corrupt pickle data
        raise BackboneError(f"{path} is not a readable torch legacy file: {exc}") from exc

    if not isinstance(state, dict):
        raise BackboneError(f"{path} holds a {type(state).__name__}, not a state dict")
    refs = [v for v in state.values() if isinstance(v, _TensorRef)]
    dtypes = {r.storage.key: r.storage.dtype for r in refs}

    storages: dict[str, np.ndarray] = {}
    pos = stream.tell()
    for key in storage_keys:
        if key not in dtypes:
            raise BackboneError(f"{path}: storage {key!r} is not used by any tensor")
        dtype = np.dtype(byte_order + dtypes[key])
        numel = int(np.frombuffer(raw, dtype=byte_order + "i8", count=1, offset=pos)[0])
        pos += 8
        if pos + numel * dtype.itemsize > len(raw):
            raise BackboneError(f"{path} is truncated (storage {key!r})")
        storages[key] = np.frombuffer(raw, dtype=dtype, count=numel, offset=pos)
        pos += numel * dtype.itemsize

    result: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if not isinstance(value, _TensorRef):
            raise BackboneError(f"{path}: entry {name!r} is not a tensor")
        result[str(name)] = _materialize(value, storages, path)
    return result


def _materialize(
    ref: _TensorRef, storages: dict[str, np.ndarray], path: str | os.PathLike[str]
) -> np.ndarray:
    """Copy a tensor's (possibly strided) view of its storage into a contiguous native array."""
    data = storages.get(ref.storage.key)
    if data is None:
        raise BackboneError(f"{path}: storage {ref.storage.key!r} has no data")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if ref.offset < 0 or (all(ref.size) and last >= data.size):
        raise BackboneError(f"{path}: a tensor reaches past the end of its storage")
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset :],
        shape=ref.size,
        strides=tuple(s * item for s in ref.stride),
        writeable=False,
    )
    # np.array, not np.ascontiguousarray: the latter turns a 0-d tensor into shape (1,).
    return np.array(view, dtype=data.dtype.newbyteorder("="), order="C", copy=True)
