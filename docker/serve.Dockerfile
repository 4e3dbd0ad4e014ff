# syntax=docker/dockerfile:1.7
#
# carclassifier model server: `carclassifier serve` (Flask app under waitress) on CPU, port 8080.
#
#   docker build -f docker/serve.Dockerfile -t REGISTRY/carclassifier/serve:TAG .   (repo root)
#   docker run --rm -p 8080:8080 -v "$PWD/runs/local/export:/models/export:ro" \
#       --read-only --tmpfs /tmp REGISTRY/carclassifier/serve:TAG
#
# tensorflow-cpu from pyproject.toml at the versions of requirements/lock.txt (no CUDA: serving
# one image at a time is cheap on CPU). The model is not in the image: --model names an export
# folder (a mounted volume or a gs:// prefix read with the pod's Workload Identity).
# Same pinned base as the trainer image (see docker/README.md for refreshing the digest).
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:528257d48c1da0dcecc2e725d1ae34498d60c965f1241e39cd6a85a8859bdf84

# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# --------------------------------------------------------------------------------------------
# deps: every runtime dependency at its locked version, without the project source (cached
# until pyproject.toml's dependency list or the lock file changes).
FROM base AS deps
WORKDIR /build
COPY pyproject.toml ./
COPY requirements/lock.txt ./requirements/
# pip-ca: the optional CA-bundle build secret, as in trainer.Dockerfile (docs/containers.md).
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && /usr/local/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && /usr/local/bin/python -m venv /opt/venv \
    && pip install --no-cache-dir "pip==26.3" \
    && pip install --no-cache-dir -r requirements.txt -c requirements/lock.txt \
    && pip check

# --------------------------------------------------------------------------------------------
# wheel: the carclassifier wheel alone (templates, static files and openapi.yaml included).
FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --------------------------------------------------------------------------------------------
# runtime: the deps stage plus the package and the user (FROM deps rather than a COPY of the
# venv: no second copy of it to make and, on a cached rebuild, to compare).
FROM deps AS runtime
# A fixed numeric uid/gid so the pod's runAsNonRoot/runAsUser: 10001 can be verified.
RUN groupadd --gid 10001 carclassifier \
    && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home \
        --home-dir /tmp --shell /usr/sbin/nologin carclassifier
# COPY, not RUN --mount=type=bind,from=wheel: buildah 1.28 failed here to bind-mount from a stage
# that came entirely from its layer cache ("couldn't find .../merged/wheels"); the wheel is ~130 kB.
COPY --from=wheel /wheels/ /wheels/
RUN pip install --no-cache-dir --no-deps /wheels/carclassifier-*.whl \
    && carclassifier serve --help > /dev/null \
    && python -c "import carclassifier.serving.app, flask, waitress, prometheus_client, tensorflow"
# The root filesystem is read-only in the pod: every cache and scratch file goes to /tmp
# (an emptyDir there; --tmpfs /tmp with docker run --read-only).
# NO_ALBUMENTATIONS_UPDATE: no request to PyPI for a newer albumentations at every start.
ENV PYTHONDONTWRITEBYTECODE=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    KERAS_HOME=/tmp/.keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=unknown
LABEL org.opencontainers.image.title="carclassifier-serve" \
      org.opencontainers.image.description="carclassifier model server: web page and JSON API (Flask + waitress, TensorFlow CPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.16-slim-bookworm"

# The Deployment passes its own arguments (--model gs://...); these are the defaults.
ENTRYPOINT ["carclassifier", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080", "--model", "/models/export"]
