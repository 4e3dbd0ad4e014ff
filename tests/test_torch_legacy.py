"""The torch legacy-format reader: reads the embedded Lite0 weights, refuses foreign pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from carclassifier.backbones.lite import imagenet_weights_path
from carclassifier.backbones.torch_legacy import (
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    read_legacy_state_dict,
)
from carclassifier.errors import BackboneError


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return read_legacy_state_dict(imagenet_weights_path())


def test_reads_all_lite0_tensors(state: dict[str, np.ndarray]) -> None:
    assert len(state) == 296
    assert sum(v.size for v in state.values()) == 4_694_073
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._expand_conv.weight"].shape == (1152, 192, 1, 1)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].shape == ()
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    for value in state.values():
        assert value.flags.c_contiguous and value.flags.owndata
    assert state["_fc.weight"].dtype == np.float32
    assert np.isfinite(state["_fc.weight"]).all()


def _legacy_header() -> bytes:
    sys_info = {"protocol_version": LEGACY_PROTOCOL_VERSION, "little_endian": True}
    return b"".join(
        pickle.dumps(obj, protocol=2)
        for obj in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, sys_info)
    )


def test_refuses_foreign_globals_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # A state dict whose unpickling would call os.system("touch <marker>").
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    bad = tmp_path / "evil.pth"
    bad.write_bytes(_legacy_header() + payload)
    with pytest.raises(BackboneError, match="refusing to unpickle os.system"):
        read_legacy_state_dict(bad)
    assert not marker.exists()


def test_refuses_non_legacy_files(tmp_path: Path) -> None:
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04rest-of-a-zip")
    with pytest.raises(BackboneError, match="zip format"):
        read_legacy_state_dict(zipped)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(pickle.dumps(42))
    with pytest.raises(BackboneError, match="magic number"):
        read_legacy_state_dict(garbage)
