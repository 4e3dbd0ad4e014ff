# carclassifier. Every target that runs Python first creates .venv and installs the pinned
# dependencies into it (the `install` prerequisite); image, serve-image, push-image, clean and
# help need no .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/recipe_local.yaml
RUN_DIR ?= runs/local
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c requirements/lock.txt

# Kubeflow: the trainer image, the recipe the pipeline is built from, the cluster
# (python -m pipelines submit|schedule|resume|preflight read KFP_HOST, KFP_NAMESPACE, EXPERIMENT,
# PIPELINE_ROOT, KFP_SERVICE_ACCOUNT, KFP_TOKEN, KFP_COOKIES from the environment; keep tokens out
# of this file: KFP_TOKEN=... make submit-pipeline; docs/cluster.md walks through a cluster)
IMAGE ?= ghcr.io/carclassifier/trainer:0.1.0
DOCKER ?= docker
PIPELINE_CONFIG ?= configs/recipe_b6.yaml
PIPELINE_PACKAGE ?= pipelines/compiled/car_classifier.yaml
RETRAIN_PACKAGE ?= pipelines/compiled/car_classifier_retrain.yaml
KFP_HOST ?=
KFP_NAMESPACE ?=
EXPERIMENT ?= carclassifier
PIPELINE_ROOT ?=
CRON ?= 0 3 * * 0
PARAMS ?=
# The KFP backend (API server) release the package is compiled for; empty: the newest supported
# (python -m pipelines compile --help lists them; docs/kfp-backend.md says what each can read).
KFP_VERSION ?=
# The KServe InferenceService (namespace/name) to roll onto a deployed or rolled-back version
INFERENCE_SERVICE ?=
COMPILE_ARGS = --image $(IMAGE) $(if $(KFP_VERSION),--kfp-version $(KFP_VERSION))
KFP_SERVICE_ACCOUNT ?= carclassifier-pipeline
RUN_ID ?=
export KFP_HOST KFP_NAMESPACE EXPERIMENT PIPELINE_ROOT KFP_SERVICE_ACCOUNT RUN_ID

# Images (Docker with BuildKit; PIP_CA=ca.pem behind a TLS-intercepting proxy), the web app
SERVE_IMAGE ?= ghcr.io/carclassifier/serve:0.1.0
PIP_CA ?=
comma := ,
SERVE_MODEL ?= $(RUN_DIR)/export
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8080
BENCH_ARGS ?=
CHAOS_FAULTS ?= 12
CHAOS_SEED ?= 1
CHAOS_ARGS ?=
# Serving versions (carclassifier.deploy): where promoted exports are published, which to roll back to
SERVING_ROOT ?=
VERSION ?=
LINT_PATHS := src tests benchmarks components pipelines docker

.PHONY: help install install-reference test test-fast lint eda run-local serve bench clean compile \
	run-pipeline-local chaos-run submit-pipeline schedule unschedule preflight resume-pipeline image serve-image \
	push-image image-test manifests-validate rollback

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install the package with its pinned dependencies

install-reference: install  ## add torch 2.13.0 CPU + efficientnet_lite_pytorch for the Lite0 reference test
	$(PIP_INSTALL) -e '.[dev,torch-reference]'

test: install  ## run the whole test suite (CI runs this; ~5-10 min on 2 cores)
	$(PY) -m pytest

test-fast: install  ## the library's unit tests: no stage training, pipeline compiles, kfp.local, emulator, browser or subprocess kills (~2 min)
	$(PY) -m pytest -m "not slow and not integration and not kfp and not image"

lint: install  ## ruff: lint rules and formatting (ruff format to fix the latter)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

eda: install  ## EDA report of the demo data (CONFIG=... for another dataset)
	$(VENV)/bin/carclassifier eda --config $(CONFIG)

run-local: install  ## the whole recipe on the embedded default (RUN_DIR=runs/local)
	$(VENV)/bin/carclassifier run-local --config $(CONFIG) --out $(RUN_DIR)

bench: install  ## CPU benchmarks (~18 min; BENCH_ARGS=--quick ~6 min), results into benchmarks/results/
	$(PY) -m benchmarks.input_pipeline $(BENCH_ARGS)
	$(PY) -m benchmarks.train_step $(BENCH_ARGS)
	$(PY) -m benchmarks.inference $(BENCH_ARGS)
	$(PY) -m benchmarks.memory $(BENCH_ARGS)
	$(PY) -m benchmarks.gcs_throughput $(BENCH_ARGS)
	$(PY) -m benchmarks.data_handoff $(BENCH_ARGS)
	$(PY) -m benchmarks.preemption_sim $(BENCH_ARGS)

compile: install  ## the recipe's kfp pipeline -> pipelines/compiled/car_classifier.yaml (IMAGE=..., KFP_VERSION=...)
	$(PY) -m pipelines compile --config $(PIPELINE_CONFIG) --out $(PIPELINE_PACKAGE) $(COMPILE_ARGS)

run-pipeline-local: install  ## the same pipeline with kfp.local on the local Lite0 recipe
	$(PY) -m pipelines run-local --config $(CONFIG) --root runs/pipeline-local

chaos-run: install  ## kfp.local pipeline under a seeded schedule of 12 faults, vs an uninterrupted run (~5 min on 2 cores; CHAOS_ARGS=...)
	$(PY) -m pipelines chaos --faults $(CHAOS_FAULTS) --seed $(CHAOS_SEED) --reference pipeline --root runs/chaos --json benchmarks/results/chaos_run.json $(CHAOS_ARGS)

submit-pipeline: compile  ## upload (a new version only if changed) and start a run on KFP_HOST
	$(PY) -m pipelines submit --package $(PIPELINE_PACKAGE) $(PARAMS)

preflight: compile  ## check KFP, namespace, service account, secrets, GPU nodes, buckets, image, IR
	$(PY) -m pipelines preflight --package $(PIPELINE_PACKAGE) $(PARAMS)

resume-pipeline: install  ## start a failed run again (RUN_ID=...): finished tasks come from the cache
	$(PY) -m pipelines resume --run-id "$(RUN_ID)"

schedule: install  ## scheduled retraining: make schedule CRON="0 3 * * 0" (fresh data every run)
	$(PY) -m pipelines compile --config $(PIPELINE_CONFIG) --out $(RETRAIN_PACKAGE) $(COMPILE_ARGS) --no-cache-data
	$(PY) -m pipelines schedule --package $(RETRAIN_PACKAGE) --cron "$(CRON)" $(PARAMS)

unschedule: install  ## delete the recurring retraining run
	$(PY) -m pipelines unschedule

image:  ## build the GPU trainer image (IMAGE=registry/path:tag; PIP_CA=ca.pem behind a TLS proxy; Docker with BuildKit)
	$(DOCKER) build --platform linux/amd64 -f docker/trainer.Dockerfile \
	  $(if $(PIP_CA),--secret id=pip-ca$(comma)src=$(PIP_CA)) \
	  --build-arg VCS_REF=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	  --build-arg BUILD_DATE=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
	  -t $(IMAGE) .

serve-image:  ## build the web app's image (SERVE_IMAGE=registry/path:tag; docker/serve.Dockerfile)
	$(DOCKER) build --platform linux/amd64 -f docker/serve.Dockerfile \
	  $(if $(PIP_CA),--secret id=pip-ca$(comma)src=$(PIP_CA)) -t $(SERVE_IMAGE) .

push-image: image  ## build and push: make push-image IMAGE=REGISTRY/carclassifier/trainer:TAG
	$(DOCKER) push $(IMAGE)

serve: install  ## web page + JSON API for an exported model on http://127.0.0.1:8080/ (SERVE_MODEL=dir or gs://...)
	$(VENV)/bin/carclassifier serve --model $(SERVE_MODEL) --host $(SERVE_HOST) --port $(SERVE_PORT)

image-test: install  ## build both images with buildah on a stand-in base, run them with podman (root, ~25 GB disk; docs/containers.md)
	$(PY) -m pytest -m image tests/test_images.py

manifests-validate: install  ## Dockerfile checks + manifests against Kubernetes and KServe schemas
	$(PY) -m pytest -q tests/test_docker_manifests.py

rollback: install  ## serve an earlier version again: make rollback SERVING_ROOT=gs://... VERSION=N [INFERENCE_SERVICE=ns/name]
	$(VENV)/bin/carclassifier rollback --serving-root "$(SERVING_ROOT)" --version "$(VERSION)" \
		--inference-service "$(INFERENCE_SERVICE)"

clean:  ## remove run outputs (keeps .venv)
	rm -rf runs tests/artifacts
