"""Rules of the real backend that the cluster side relies on, ported from their sources.

* RBAC: every Kubernetes API call the pods of a run make as ``carclassifier-pipeline`` is
  allowed by manifests/rbac.yaml (the calls read in kubeflow/pipelines and argo-workflows).
* Retries: what Argo does with the retryStrategy KFP compiles from ``set_retry``.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from carclassifier.kubeflow import kfp_versions

REPO = Path(__file__).resolve().parents[1]

# (who, apiGroup, resource, verb, name or "", where it is called)
POD_CALLS = [
    ("argo executor", "argoproj.io", "workflowtaskresults", "create", "",
     "argoproj/argo-workflows docs/workflow-rbac.md 'For >= v3.4', tag v4.0.5"),
    ("argo executor", "argoproj.io", "workflowtaskresults", "patch", "",
     "argoproj/argo-workflows docs/workflow-rbac.md 'For >= v3.4', tag v4.0.5"),
    ("kfp driver", "", "pods", "get", "",
     "kubeflow/pipelines backend/src/v2/driver/k8s.go publishDriverExecution, tag 2.17.0 "
     "(driver.go at 2.4.0)"),
    ("kfp launcher", "", "pods", "get", "",
     "kubeflow/pipelines backend/src/v2/component/launcher_v2.go retryIndexFromPodAnnotation, "
     "tag 2.17.0"),
    ("kfp driver/launcher", "", "configmaps", "get", "kfp-launcher",
     "kubeflow/pipelines backend/src/v2/config/env.go FromConfigMap, tags 2.4.0 and 2.17.0"),
    ("deploy step", "serving.kserve.io", "inferenceservices", "patch", "",
     "our src/carclassifier/kubeflow/kserve.py roll_out (CustomObjectsApi merge patch)"),
]  # fmt: skip


def _allows(rule: dict, group: str, resource: str, verb: str, name: str) -> bool:
    """One PolicyRule against one request, as kubernetes pkg/apis/rbac/v1/evaluation_helpers.go
    (VerbMatches, APIGroupMatches, ResourceMatches, ResourceNameMatches) decides it."""

    def match(values: list, wanted: str) -> bool:
        return "*" in values or wanted in values

    names = rule.get("resourceNames") or []
    return (
        match(rule.get("verbs", []), verb)
        and match(rule.get("apiGroups", []), group)
        and match(rule.get("resources", []), resource)
        and (not names or name in names)
    )


def test_the_pipeline_role_allows_every_call_the_pods_make() -> None:
    """Each call in POD_CALLS, read in the upstream source it names, is allowed by the Role
    bound to carclassifier-pipeline (a RoleBinding subject without a namespace is the binding's
    own namespace: kubernetes pkg/registry/rbac/validation/rule.go, appliesToUser), so the
    same file works in a profile namespace and in standalone KFP's ``kubeflow``."""
    docs = list(yaml.safe_load_all((REPO / "manifests/rbac.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "Role")
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    assert subject == {"kind": "ServiceAccount", "name": "carclassifier-pipeline"}
    denied = [
        f"{who}: {verb} {group or 'core'}/{resource} {name} ({where})"
        for who, group, resource, verb, name, where in POD_CALLS
        if not any(_allows(rule, group, resource, verb, name) for rule in role["rules"])
    ]
    assert denied == []
    secrets = [r for r in role["rules"] if "secrets" in r.get("resources", [])]
    assert secrets == []  # secrets reach pods as volumes/env from the kubelet, not the API


# --------------------------------------------------------------------------------- retries


@dataclass
class ArgoRetry:
    """The retryStrategy KFP's argocompiler writes for a task with a retry policy: limit and
    backoff from the IR, NO retryPolicy (kubeflow/pipelines backend/src/v2/compiler/
    argocompiler/container.go, getTaskRetryStrategyFromInput / getTaskRetryParametersWithValues,
    tag 2.17.0; KFP before 2.5.0 writes no retryStrategy at all)."""

    limit: int
    duration_s: float
    factor: float
    max_duration_s: float
    policy: str = ""

    def policy_actual(self) -> str:
        """argo-workflows pkg/apis/workflow/v1alpha1/workflow_types.go RetryPolicyActual,
        tag v4.0.5: no policy and no expression → OnFailure."""
        return self.policy or "OnFailure"

    def retries(self, phase: str, attempts: int, first_start_s: float, now_s: float) -> bool:
        """argo-workflows workflow/controller/operator.go processNodeRetries, tag v4.0.5:
        past backoff.maxDuration since the FIRST attempt's start → no retry; a Failed node is
        retried under OnFailure/Always, an Error node only under OnError/Always; then limit."""
        if now_s > first_start_s + self.max_duration_s:
            return False  # "Max duration limit exceeded"
        wait = self.duration_s * self.factor ** (attempts - 1)
        if now_s + wait > first_start_s + self.max_duration_s:
            return False  # "Backoff would exceed max duration limit"
        on_failed = self.policy_actual() in ("OnFailure", "Always")
        on_error = self.policy_actual() in ("OnError", "Always")
        if (phase == "Failed" and not on_failed) or (phase == "Error" and not on_error):
            return False
        return attempts <= self.limit


def _seconds(text: str) -> float:
    assert text.endswith("s"), text
    return float(text[:-1])


@pytest.fixture(scope="module")
def retry_policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ArgoRetry]:
    from pipelines.car_classifier import compile_pipeline

    out = compile_pipeline(
        REPO / "configs/recipe_b6.yaml", tmp_path_factory.mktemp("ir") / "p.yaml", "r.example/t:1"
    )
    spec = next(yaml.safe_load_all(out.read_text()))
    policies = {}
    for name, task, _ in kfp_versions.walk_tasks(spec):
        if "retryPolicy" not in task:
            continue  # the exit handler's and the condition's groups (their tasks retry)
        p = task["retryPolicy"]
        policies[name] = ArgoRetry(
            p["maxRetryCount"],
            _seconds(p["backoffDuration"]),
            p["backoffFactor"],
            _seconds(p["backoffMaxDuration"]),
        )
    return policies


def test_failed_pods_are_retried_lost_pods_are_not(retry_policies: dict[str, ArgoRetry]) -> None:
    """A main container that exits non-zero (a crash, or SIGTERM/SIGKILL at a graceful spot
    preemption: exit 143/137) makes the node Failed; a pod that is deleted or whose node is
    gone makes it Error ("pod deleted"; init/wait container failures too: operator.go,
    podReconciliation / inferFailedReason, tag v4.0.5). With KFP's policy-less retryStrategy
    only the first is retried: the second fails the run, and `python -m pipelines resume`
    (make resume-pipeline RUN_ID=...) starts it again. The SDK cannot set a retryPolicy
    (kfp 2.17.3 PipelineTask.set_retry has none; pipeline_spec.proto RetryPolicy has only
    max_retry_count and the backoff fields, tag 2.17.0)."""
    import inspect

    from kfp.dsl.pipeline_task import PipelineTask

    assert "policy" not in " ".join(inspect.signature(PipelineTask.set_retry).parameters)
    assert retry_policies
    for name, retry in retry_policies.items():
        assert retry.retries("Failed", attempts=1, first_start_s=0, now_s=60), name
        assert not retry.retries("Error", attempts=1, first_start_s=0, now_s=60), name


def test_a_long_stage_is_still_retried(retry_policies: dict[str, ArgoRetry]) -> None:
    """Argo measures backoff.maxDuration from the FIRST attempt's start (operator.go,
    processNodeRetries, tag v4.0.5), and KFP maps backoff_max_duration to it: with kfp's
    default 3600 s a stage preempted after 90 minutes of training would not be retried.
    Every retry budget covers a whole day (more than stage timeouts + backoff)."""
    for name, retry in retry_policies.items():
        assert retry.max_duration_s >= 24 * 3600, name
        ninety_minutes = 90 * 60
        assert retry.retries("Failed", attempts=1, first_start_s=0, now_s=ninety_minutes), name
