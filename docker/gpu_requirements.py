"""Requirement and constraint files for the GPU trainer image (stdlib only, runs in the build).

The package's own dependencies pin ``tensorflow-cpu`` (the wheel for CPU machines and CI). The
GPU image must instead have ``tensorflow[and-cuda]`` of the *same* version, which brings CUDA and
cuDNN as pip wheels, and must not install ``tensorflow-cpu`` at all (the two wheels write the
same ``tensorflow`` package). This script writes

- ``requirements-gpu.txt``: ``[project].dependencies`` of pyproject.toml with the
  ``tensorflow-cpu`` line replaced by the ``--tensorflow`` requirement;
- ``constraints-gpu.txt``: requirements/lock.txt without its ``tensorflow-cpu`` line, so every
  other package (direct or transitive) gets the version CI tested.

It refuses (exit 2) when the ``--tensorflow`` version differs from the ``tensorflow-cpu`` pin, so
the image can never drift from the version the tests ran with.

    python docker/gpu_requirements.py --pyproject pyproject.toml --lock requirements/lock.txt \
        --tensorflow 'tensorflow[and-cuda]==2.21.0' --out-dir /tmp/req
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

CPU_PACKAGE = "tensorflow-cpu"
REQUIREMENTS_FILE = "requirements-gpu.txt"
CONSTRAINTS_FILE = "constraints-gpu.txt"

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_PIN = re.compile(r"==\s*([A-Za-z0-9.+!_-]+)\s*(?:;.*)?$")
_GPU_TF = re.compile(r"^tensorflow\[and-cuda\]==([0-9][A-Za-z0-9.+!_-]*)$")


class RequirementsError(Exception):
    """The inputs do not allow a consistent GPU requirement set."""


def normalize(name: str) -> str:
    """PEP 503 normalized project name: ``TensorFlow_CPU`` -> ``tensorflow-cpu``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    """Normalized project name of a requirement line; None for blank lines and comments."""
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("-"):
        return None
    match = _NAME.match(text)
    return normalize(match.group(1)) if match else None


def pinned_version(requirement: str) -> str | None:
    """The version of an ``name==version`` requirement, else None."""
    match = _PIN.search(requirement.split("#", 1)[0].strip())
    return match.group(1) if match else None


def gpu_requirements(dependencies: list[str], tensorflow: str) -> list[str]:
    """``dependencies`` with the tensorflow-cpu pin replaced by ``tensorflow`` (same version)."""
    gpu = _GPU_TF.match(tensorflow.strip())
    if gpu is None:
        raise RequirementsError(
            f"--tensorflow must look like 'tensorflow[and-cuda]==X.Y.Z', got {tensorflow!r}"
        )
    cpu = [dep for dep in dependencies if requirement_name(dep) == CPU_PACKAGE]
    if len(cpu) != 1:
        raise RequirementsError(
            f"pyproject.toml must list {CPU_PACKAGE} exactly once, found {len(cpu)}"
        )
    cpu_version = pinned_version(cpu[0])
    if cpu_version != gpu.group(1):
        raise RequirementsError(
            f"GPU image asks for TensorFlow {gpu.group(1)} but pyproject.toml pins "
            f"{cpu[0]!r}: change both together"
        )
    return [tensorflow.strip() if dep is cpu[0] else dep for dep in dependencies]


def gpu_constraints(lock_lines: list[str]) -> list[str]:
    """The lock file without its tensorflow-cpu line (comments kept)."""
    kept = [line for line in lock_lines if requirement_name(line) != CPU_PACKAGE]
    if len(kept) == len(lock_lines):
        raise RequirementsError(f"the lock file has no {CPU_PACKAGE} pin")
    return kept


def write_files(pyproject: Path, lock: Path, tensorflow: str, out_dir: Path) -> tuple[Path, Path]:
    """Write both files into ``out_dir``; return their paths (requirements, constraints)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = gpu_requirements(list(project["dependencies"]), tensorflow)
    constraints = gpu_constraints(lock.read_text(encoding="utf-8").splitlines())
    out_dir.mkdir(parents=True, exist_ok=True)
    req_path = out_dir / REQUIREMENTS_FILE
    con_path = out_dir / CONSTRAINTS_FILE
    req_path.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    con_path.write_text("\n".join(constraints) + "\n", encoding="utf-8")
    return req_path, con_path


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--pyproject", type=Path, required=True)
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--tensorflow", required=True, help="e.g. 'tensorflow[and-cuda]==2.21.0'")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        req, con = write_files(args.pyproject, args.lock, args.tensorflow, args.out_dir)
    except (RequirementsError, OSError, KeyError) as exc:
        print(f"gpu_requirements: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {req} and {con}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
