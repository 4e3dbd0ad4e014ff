"""Field lists of the kfp-kubernetes proto as each KFP backend release compiled it in, read
from a git mirror of kubeflow/pipelines (dev tool and test helper; not imported at run time).

Which proto a release's driver and API server were built with is in that tag's ``go.mod``:
``github.com/kubeflow/pipelines/kubernetes_platform`` at a pseudo-version (2.2.0 ... 2.4.1: the
proto at that commit) or ``replace ... => ./kubernetes_platform`` (2.5.0 on: the proto at the tag).

    python -m tests.kfp_protos [MIRROR]   # rewrite src/carclassifier/kubeflow/kfp_backend_fields.json
"""

import json
import re
import subprocess
import sys
from pathlib import Path

from proto_schema_parser import ast
from proto_schema_parser.parser import Parser

from carclassifier.kubeflow.kfp_versions import FIELDS_FILE, SUPPORTED_VERSIONS

MIRROR = Path("/work/.mirror/kubeflow+pipelines/repo")
PROTO = "kubernetes_platform/proto/kubernetes_executor_config.proto"
MODULE = "github.com/kubeflow/pipelines/kubernetes_platform"


def show(mirror: Path, rev: str, path: str) -> str:
    """``git show REV:PATH`` of the mirror."""
    return subprocess.run(
        ["git", "-C", str(mirror), "show", f"{rev}:{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def kubernetes_platform_rev(mirror: Path, tag: str) -> str:
    """The commit (12 hex digits) or tag whose kfp-kubernetes proto the backend ``tag`` built
    with, from its go.mod (a ``replace`` to ./kubernetes_platform means the tag itself)."""
    gomod = show(mirror, tag, "go.mod")
    if re.search(rf"^\s*{re.escape(MODULE)}\s*=>\s*\./kubernetes_platform\s*$", gomod, re.M):
        return tag
    match = re.search(rf"^\s*{re.escape(MODULE)} v\S*-([0-9a-f]{{12}})\s*$", gomod, re.M)
    if not match:
        raise ValueError(f"{tag}: no {MODULE} requirement in go.mod")
    return match.group(1)


def message_fields(proto_text: str) -> dict[str, dict[str, str]]:
    """``{message: {field: type}}`` of a .proto file; nested messages as ``Outer.Inner``,
    oneof members flattened, map fields typed ``map``, enums omitted (scalars to a walker)."""
    out: dict[str, dict[str, str]] = {}

    def walk(message: ast.Message, prefix: str) -> None:
        name = prefix + message.name
        fields: dict[str, str] = {}

        def add(elements: list) -> None:
            for element in elements:
                if isinstance(element, ast.Field):
                    fields[element.name] = element.type
                elif isinstance(element, ast.MapField):
                    fields[element.name] = "map"
                elif isinstance(element, ast.OneOf):
                    add(element.elements)
                elif isinstance(element, ast.Message):
                    walk(element, name + ".")

        add(message.elements)
        out[name] = dict(sorted(fields.items()))

    for element in Parser().parse(proto_text).file_elements:
        if isinstance(element, ast.Message):
            walk(element, "")
    return dict(sorted(out.items()))


def derive(mirror: Path = MIRROR) -> dict:
    """The content of `FIELDS_FILE`: per supported version the proto revision, per revision
    the KubernetesExecutorConfig field lists."""
    revs = {version: kubernetes_platform_rev(mirror, version) for version in SUPPORTED_VERSIONS}
    return {
        "source": f"kubeflow/pipelines {PROTO}, at the revision each tag's go.mod names",
        "kubernetes_platform_rev": revs,
        "kubernetes_executor_config": {
            rev: message_fields(show(mirror, rev, PROTO)) for rev in sorted(set(revs.values()))
        },
    }


if __name__ == "__main__":
    data = derive(Path(sys.argv[1]) if len(sys.argv) > 1 else MIRROR)
    FIELDS_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(FIELDS_FILE)
