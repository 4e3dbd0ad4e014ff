# syntax=docker/dockerfile:1.7
#
# carclassifier GPU trainer image. Every Kubeflow Pipelines component of the training pipeline
# runs in it: kfp replaces the container command with its own launcher, so the image only has to
# provide Python, the pinned dependencies and the installed `carclassifier` package (and kfp, a
# dependency, so components use install_kfp_package=False).
#
#   make image                      # docker build -f docker/trainer.Dockerfile . (repo root)
#   make push-image IMAGE=REGISTRY/carclassifier/trainer:TAG
#
# Base image: python slim, not nvidia/cuda. tensorflow[and-cuda] installs CUDA 12 and cuDNN 9 as
# pip wheels (versions pinned in docker/gpu-constraints.txt) and TensorFlow loads them from
# site-packages; an nvidia/cuda base would add a second, unused CUDA (gigabytes) whose version
# could disagree with the one TensorFlow actually loads. All the image needs from the host is the
# NVIDIA driver (libcuda), which the GPU node provides. Python 3.11 because pyproject.toml
# requires it; Debian bookworm's glibc 2.36 covers the manylinux_2_27 TensorFlow wheel.
# Pinned by full version tag and by digest (the digest wins; refresh both together, see
# docker/README.md). Linux/amd64: GKE GPU nodes are x86_64.
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:528257d48c1da0dcecc2e725d1ae34498d60c965f1241e39cd6a85a8859bdf84

# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/nvidia/bin:${PATH}

# --------------------------------------------------------------------------------------------
# requirements: the GPU requirement and constraint files, derived from pyproject.toml and the
# lock file: pyproject's dependencies with tensorflow-cpu swapped for TENSORFLOW_REQUIREMENT (same
# version, checked), and the lock without tensorflow-cpu. tensorflow-cpu must never be installed
# next to tensorflow: both wheels write the same `tensorflow` package. A separate stage, so an
# edit of pyproject.toml that leaves the dependencies alone (ruff settings, version) yields the
# same files and the big install layer below stays cached.
FROM base AS requirements
ARG TENSORFLOW_REQUIREMENT="tensorflow[and-cuda]==2.21.0"
WORKDIR /build
COPY pyproject.toml ./
COPY requirements/lock.txt ./requirements/
COPY docker/gpu_requirements.py ./docker/
RUN /usr/local/bin/python docker/gpu_requirements.py --pyproject pyproject.toml \
        --lock requirements/lock.txt --tensorflow "${TENSORFLOW_REQUIREMENT}" --out-dir /build/gpu

# --------------------------------------------------------------------------------------------
# deps: a virtualenv with every dependency at its pinned version and no project source, rebuilt
# only when the requirement files or the GPU pins change.
FROM base AS deps
COPY --from=requirements /build/gpu/ /build/gpu/
COPY docker/gpu-constraints.txt /build/gpu/
# pip-ca: an optional build secret, the CA bundle pip trusts during the build (behind a
# TLS-intercepting proxy: --secret id=pip-ca,src=FILE). A secret is mounted for this RUN only,
# never stored in a layer, and does not change the layer cache key; without it pip uses its own.
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && /usr/local/bin/python -m venv /opt/venv \
    && pip install --no-cache-dir "pip==26.3" \
    && pip install --no-cache-dir \
        -r /build/gpu/requirements-gpu.txt \
        -c /build/gpu/constraints-gpu.txt \
        -c /build/gpu/gpu-constraints.txt \
        --build-constraint /build/gpu/gpu-constraints.txt \
    && pip check \
    && if pip show --quiet tensorflow-cpu 2>/dev/null; then \
        echo "tensorflow-cpu must not be in the GPU image" >&2; exit 1; fi

# --------------------------------------------------------------------------------------------
# wheel: the carclassifier wheel alone (build tools pinned by --build-constraint).
FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && pip wheel --no-cache-dir --no-deps --build-constraint /build/gpu/gpu-constraints.txt \
        --wheel-dir /wheels .

# --------------------------------------------------------------------------------------------
# runtime: the deps stage (the venv) plus the package and the user. FROM deps, not a COPY of
# /opt/venv into a fresh base: the same layers, without copying and committing the 6 GB venv a
# second time (a cached rebuild had to copy it again to compare it, ~70 s; a cold build needed
# that much more disk). deps adds nothing else but its three requirement files in /build/gpu.
FROM deps AS runtime
# A fixed numeric uid/gid, so pods can use runAsNonRoot/runAsUser: 10001 and Kubernetes can
# verify it (the pipeline sets the same ids: pipelines/car_classifier.py RUN_AS_USER). Above
# 10000, so it matches no user of the node. A writable home for the caches Keras, matplotlib
# and the Kaggle client write; no credentials are copied in (they come from env / mounted secrets).
RUN groupadd --gid 10001 carclassifier \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home \
        --home-dir /home/carclassifier --shell /usr/sbin/nologin carclassifier \
    && install -d -o 10001 -g 10001 -m 0750 /workspace
# The package without its dependencies (they are all in the venv; --no-deps keeps pip from
# pulling tensorflow-cpu, which carclassifier's metadata names), then a smoke check.
# COPY, not RUN --mount=type=bind,from=wheel: buildah 1.28 failed here to bind-mount from a stage
# that came entirely from its layer cache ("couldn't find .../merged/wheels"); the wheel is ~130 kB.
COPY --from=wheel /wheels/ /wheels/
RUN pip install --no-cache-dir --no-deps /wheels/carclassifier-*.whl \
    && carclassifier --help > /dev/null \
    && python -c "import albumentations, carclassifier, cv2, google.cloud.storage, keras, kfp, tensorflow"
# GKE mounts the node's NVIDIA driver at /usr/local/nvidia (libraries in lib64, nvidia-smi in
# bin); other clusters' NVIDIA container toolkit injects it into the system library path.
# NVIDIA_VISIBLE_DEVICES is deliberately not set: the device plugin sets it per pod, and "all"
# in the image would expose every GPU of a node to pods that did not request one.
# Caches go to /tmp, writable also when the root filesystem is read-only (a pod with
# readOnlyRootFilesystem and an emptyDir at /tmp; docker run --read-only --tmpfs /tmp):
# matplotlib's font cache, Keras' downloaded weights, carclassifier's input cache.
# NO_ALBUMENTATIONS_UPDATE: albumentations otherwise asks PyPI for a newer release at every
# import, i.e. in every task (a request to the internet from each pod, a warning without it).
ENV PYTHONDONTWRITEBYTECODE=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/carclassifier \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    KERAS_HOME=/tmp/keras \
    CARCLASSIFIER_CACHE=/tmp/carclassifier-cache \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /workspace
USER 10001:10001

# Last, so a new commit only changes metadata, not the layers above.
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=unknown
LABEL org.opencontainers.image.title="carclassifier-trainer" \
      org.opencontainers.image.description="GPU trainer for the carclassifier Kubeflow pipeline: TensorFlow 2.21 (CUDA 12.5, cuDNN 9.3 wheels), Keras 3, kfp 2.17 and the carclassifier package" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.16-slim-bookworm"

# kfp overrides the command; run by hand, the image prints the CLI's help.
CMD ["carclassifier", "--help"]
