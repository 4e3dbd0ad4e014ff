#!/usr/bin/env bash
# Google service accounts for the two Kubernetes service accounts of ../serviceaccounts.yaml,
# their bucket roles, and the Workload Identity bindings that let each KSA act as its GSA.
# The cluster (and the GPU pool, see gpu-node-pool.sh) must have Workload Identity enabled.
#
#   PROJECT_ID=my-project BUCKET=my-bucket manifests/gke/workload-identity.sh
#   DRY_RUN=1 ...   prints the commands instead of running them
#
# Then set the iam.gke.io/gcp-service-account annotations to the printed emails (an overlay
# patch, manifests/README.md) and apply the manifests.
set -euo pipefail

: "${PROJECT_ID:?set PROJECT_ID}"
: "${BUCKET:?set BUCKET (name only, no gs://)}"
NAMESPACE="${NAMESPACE:-carclassifier}"

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "+ $*"
  else
    "$@"
  fi
}

# KSA name = GSA name; pipeline pods write, the model server only reads.
for entry in "carclassifier-pipeline roles/storage.objectAdmin" \
             "carclassifier-serving roles/storage.objectViewer"; do
  read -r name role <<< "$entry"
  gsa="${name}@${PROJECT_ID}.iam.gserviceaccount.com"
  if [[ "${DRY_RUN:-0}" == "1" ]] || ! gcloud iam service-accounts describe "$gsa" \
      --project "$PROJECT_ID" > /dev/null 2>&1; then
    run gcloud iam service-accounts create "$name" --project "$PROJECT_ID" \
      --display-name "carclassifier ${name#carclassifier-}"
  fi
  run gcloud storage buckets add-iam-policy-binding "gs://${BUCKET}" \
    --member "serviceAccount:${gsa}" --role "$role"
  run gcloud iam service-accounts add-iam-policy-binding "$gsa" --project "$PROJECT_ID" \
    --role roles/iam.workloadIdentityUser \
    --member "serviceAccount:${PROJECT_ID}.svc.id.goog[${NAMESPACE}/${name}]"
  echo "annotation for ${NAMESPACE}/${name}: iam.gke.io/gcp-service-account: ${gsa}"
done
