"""The served API keeps its own contract: schemathesis, run as a user would run it
(``schemathesis run URL/openapi.yaml --checks all``), against the real server on 127.0.0.1.

It generates requests from ``/openapi.yaml`` (schema examples, the coverage phase's boundary
values and undeclared methods, random fuzzing) and checks every answer against the spec:
schema-valid requests accepted, schema-violating ones rejected with a 4xx, responses matching
their declared schemas and content types, a 405 carrying ``Allow`` (RFC 9110), no 5xx.
Bounded: a fixed seed, 30 examples per operation, one worker, a time limit.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serving_support import export_fixture, running_server

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = Path(__file__).with_name("schemathesis.toml")  # why one 400 is accepted


@pytest.mark.slow
def test_server_keeps_its_openapi_contract(tmp_path: Path) -> None:
    if not SCHEMATHESIS.exists():
        pytest.fail(f"schemathesis is not installed next to {sys.executable}: make install")
    export = export_fixture(tmp_path)
    with running_server(export, tmp_path / "server.log") as server:
        result = subprocess.run(
            [str(SCHEMATHESIS), "--config-file", str(CONFIG), "run", f"{server.url}/openapi.yaml",
             "--checks", "all",
             "--phases", "examples,coverage,fuzzing", "--max-examples", "30", "--workers", "1",
             "--seed", "1", "--suppress-health-check", "all", "--no-color"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Tested: 5" in result.stdout  # every operation of the spec was exercised
    shutil.rmtree(tmp_path / ".schemathesis", ignore_errors=True)
