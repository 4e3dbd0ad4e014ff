#!/usr/bin/env bash
# Create the GKE GPU node pool the training components run on. A node pool is not a Kubernetes
# object, so it is a gcloud command rather than a manifest.
#
#   PROJECT_ID=my-project CLUSTER=my-cluster LOCATION=europe-west4 manifests/gke/gpu-node-pool.sh
#   DRY_RUN=1 ...   prints the command instead of running it
#
# Scheduling contract with the pipeline (pipelines/car_classifier.py, ClusterOptions):
#   node label  cloud.google.com/gke-accelerator=$ACCELERATOR   set by GKE on every GPU node;
#               the GPU tasks select it (default nvidia-tesla-t4, keep the two in step)
#   taint       nvidia.com/gpu=present:NoSchedule   added by GKE to GPU pools of a cluster that
#               also has CPU pools; the GPU tasks tolerate key nvidia.com/gpu (operator Exists)
#   spot        label cloud.google.com/gke-spot=true: cheaper, preemptible; a preempted stage is
#               retried and resumes from its per-epoch checkpoints (SPOT=0 for on-demand nodes)
# The pool scales from 0: no GPU node runs (or costs) while no GPU task is pending.
set -euo pipefail

: "${PROJECT_ID:?set PROJECT_ID}"
: "${CLUSTER:?set CLUSTER}"
: "${LOCATION:?set LOCATION (the cluster region or zone)}"
POOL="${POOL:-gpu-t4}"
ACCELERATOR="${ACCELERATOR:-nvidia-tesla-t4}"   # e.g. nvidia-l4 with MACHINE_TYPE=g2-standard-8
MACHINE_TYPE="${MACHINE_TYPE:-n1-standard-8}"
GPUS_PER_NODE="${GPUS_PER_NODE:-1}"
MAX_NODES="${MAX_NODES:-2}"                     # per zone
DISK_SIZE_GB="${DISK_SIZE_GB:-200}"             # the trainer image is several GB, plus the data
SPOT="${SPOT:-1}"

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "+ $*"
  else
    "$@"
  fi
}

args=(
  container node-pools create "$POOL"
  --project "$PROJECT_ID"
  --cluster "$CLUSTER"
  --location "$LOCATION"
  --machine-type "$MACHINE_TYPE"
  --accelerator "type=${ACCELERATOR},count=${GPUS_PER_NODE},gpu-driver-version=latest"
  --num-nodes 0
  --enable-autoscaling --min-nodes 0 --max-nodes "$MAX_NODES"
  --disk-type pd-balanced --disk-size "$DISK_SIZE_GB"
  --workload-metadata GKE_METADATA
)
if [[ "$SPOT" == "1" ]]; then
  args+=(--spot)
fi
if [[ -n "${NODE_LOCATIONS:-}" ]]; then  # zones of a regional cluster that have $ACCELERATOR
  args+=(--node-locations "$NODE_LOCATIONS")
fi

run gcloud "${args[@]}"
