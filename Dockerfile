# syntax=docker/dockerfile:1
#
# rpnt serve: the real-time decoder daemon + HTTP control plane + calibration worker.
#
# CPU host (default):
#   docker build -t rpnt .
# NVIDIA host (onnxruntime-gpu instead of onnxruntime; run with `--gpus all` and
# RPNT_MODEL__BACKEND=onnx-cuda). Pick a CUDA 12 + cuDNN 9 runtime image that matches the
# onnxruntime-gpu release that pip resolves:
#   docker build -t rpnt:gpu --build-arg RPNT_EXTRA=gpu \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 .
#
# Build arguments:
#   BASE_IMAGE       python:3.11-slim (CPU). Any Debian/Ubuntu image works: if it has no $PYTHON
#                    (the CUDA images have none), $PYTHON and its venv module are installed with
#                    apt (on Ubuntu 22.04 that is python3.11 from universe). A mirror or a local
#                    registry: --build-arg BASE_IMAGE=registry.lab.example/python:3.11-slim
#   PYTHON           interpreter to build the virtualenv with (>= 3.11), default python3.11.
#   RPNT_EXTRA       which pyproject extra to install: serve (ONNX Runtime CPU) or gpu (onnxruntime-gpu).
#   TORCH_INDEX_URL  where the pinned CPU torch comes from: the PyTorch CPU index by default, or a
#                    mirror of it (a proxy cache, a local index on an air-gapped network).
#   TORCH_WHEEL      instead: the file name of a torch wheel you put in deploy/wheels/ (e.g.
#                    torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl); nothing is downloaded
#                    for torch itself. The directory is read through a build mount (RUN --mount:
#                    BuildKit, podman, buildah), not copied into a layer.
#   PIP_INDEX_URL    the index for everything else (default PyPI): a local mirror on an
#                    air-gapped network (pip reads it from the environment).
# Proxies: docker passes HTTP_PROXY / HTTPS_PROXY / NO_PROXY build args through to pip and apt
# without declaring them (docker build --build-arg HTTPS_PROXY=http://proxy:3128 .).
#
# Offline build, e.g.:
#   cp torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl deploy/wheels/
#   docker build --build-arg TORCH_WHEEL=torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
#       --build-arg PIP_INDEX_URL=http://pypi.lab.local/simple \
#       --build-arg BASE_IMAGE=registry.lab.local/python:3.11-slim .
#
# podman / buildah: build with --format docker (podman build --format docker -t rpnt .). Their
# default OCI image format has no HEALTHCHECK: it is dropped with a warning, and the container
# never reports healthy.
#
# See deploy/OPERATIONS.md for running it.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PYTHON=python3.11
ARG RPNT_EXTRA=serve
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEEL=
ARG PIP_INDEX_URL=https://pypi.org/simple

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/rpnt \
    PATH=/opt/rpnt/bin:$PATH

# Python (only if the base image lacks it) + an isolated virtualenv for rpnt.
RUN set -eux; \
    if ! command -v "${PYTHON}" >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "${PYTHON}" "${PYTHON}-venv" ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    "${PYTHON}" -m venv /opt/rpnt; \
    /opt/rpnt/bin/python -m pip install --upgrade pip

# torch is a core dependency (the calibration worker finetunes with it; the decode path runs on
# ONNX Runtime). Install the pinned CPU wheel FIRST, from the CPU index (or TORCH_WHEEL): otherwise
# pip resolves `torch==2.13.0` from PyPI, which pulls several GB of CUDA wheels. `pip install .`
# below then finds torch==2.13.0 (+cpu) already satisfied and leaves it alone. Own layer: cached
# across source changes. torch's own dependencies come from the same index (the PyTorch index
# carries them), or, with TORCH_WHEEL, from PIP_INDEX_URL.
RUN --mount=type=bind,source=deploy/wheels,target=/mnt/wheels \
    set -eux; \
    if [ -n "${TORCH_WHEEL}" ]; then \
        pip install "/mnt/wheels/${TORCH_WHEEL}"; \
    else \
        pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"; \
    fi

# The package itself, with the serving extra.
WORKDIR /srv/rpnt
COPY pyproject.toml README.md ./
COPY rpnt_core ./rpnt_core
COPY exporters ./exporters
COPY streaming ./streaming
COPY service ./service
RUN pip install ".[${RPNT_EXTRA}]" \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    && rpnt --help >/dev/null

# Configuration: every setting with its default (generated from service/settings.py).
COPY deploy/rpnt.example.toml /etc/rpnt/rpnt.toml

# Non-root user with a writable HOME (ONNX Runtime and other libraries write small files there;
# without one ONNX Runtime warns at every start); the model registry (every version, active.json,
# api-token) is a volume.
RUN set -eux; \
    (groupadd --system rpnt || true); \
    useradd --system --gid rpnt --home-dir /home/rpnt --create-home --shell /usr/sbin/nologin rpnt; \
    mkdir -p /var/lib/rpnt; \
    chown rpnt:rpnt /var/lib/rpnt; \
    chmod 0750 /var/lib/rpnt /home/rpnt

# Inside a container the defaults (loopback only) are unreachable from outside, so:
#   - the HTTP control plane binds 0.0.0.0, which the settings only accept with
#     http.allow_remote = true;
#   - the ZeroMQ ingest (PULL) and publish (PUB) endpoints bind tcp://0.0.0.0, which the daemon
#     only accepts with daemon.allow_remote = true;
#   - the registry lives on the volume.
# These are environment overrides (RPNT_<SECTION>__<FIELD>), which win over /etc/rpnt/rpnt.toml;
# override them with `docker run -e ...`. Exposing the ports is then up to `docker run`
# (-p 127.0.0.1:8000:8000 keeps them on the host's loopback). The mutating endpoints need the
# bearer token: pass RPNT_API_TOKEN, or read the generated /var/lib/rpnt/api-token.
ENV RPNT_HTTP__HOST=0.0.0.0 \
    RPNT_HTTP__ALLOW_REMOTE=true \
    RPNT_DAEMON__INGEST=tcp://0.0.0.0:5555 \
    RPNT_DAEMON__PUBLISH=tcp://0.0.0.0:5556 \
    RPNT_DAEMON__ALLOW_REMOTE=true \
    RPNT_REGISTRY__ROOT=/var/lib/rpnt \
    OMP_NUM_THREADS=1 \
    HOME=/home/rpnt

USER rpnt
VOLUME ["/var/lib/rpnt"]

# 8000 HTTP control plane, 5555 ZeroMQ ingest (rig → daemon), 5556 ZeroMQ predictions (PUB).
EXPOSE 8000 5555 5556

# Liveness only (/health); /ready says whether a model is loaded and warm. If you move the HTTP
# port (RPNT_HTTP__PORT), override this check too (docker run --health-cmd ...).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# SIGTERM (docker stop) shuts the daemon down cleanly; give it time: docker stop -t 20.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rpnt", "serve"]
CMD ["--config", "/etc/rpnt/rpnt.toml"]
