# syntax=docker/dockerfile:1
# acs-serve: the budgeted inference server in a non-root container.
#
#   docker build -t acs-serve:0.1.0 .
#   docker run --rm -p 8000:8000 acs-serve:0.1.0                          # CPU
#   docker run --rm --gpus all -p 8000:8000 acs-serve:0.1.0               # GPU (nvidia-container-toolkit)
#   docker run --rm -p 8000:8000 -v "$PWD/weights:/app/weights:ro" acs-serve:0.1.0   # other weights
#
# torch comes from PyPI at the version pinned in constraints.txt: a CUDA build that also runs
# on the CPU, so one image serves on either (ACS_DEVICE=auto picks cuda when a GPU is visible).
# For a smaller CPU-only image: --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The pinned torch and torchvision first: the largest layer, rebuilt only when the pins change.
COPY constraints.txt ./
RUN pip install --no-cache-dir -r constraints.txt
COPY pyproject.toml README.md ./
COPY models/ models/
COPY service/ service/
COPY training/ training/
RUN pip install --no-cache-dir -c constraints.txt . \
    && python -c "import service.app, models.core.registry"

# Checkpoints readable by the serving user, whatever modes they had in the build context.
FROM ${PYTHON_IMAGE} AS weights
COPY weights/ /weights/
RUN chmod -R a+rX /weights

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="acs-serve" \
      org.opencontainers.image.description="Adaptive Channel Skipping CNNs under a per-request compute budget" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 acs \
    && useradd --system --uid 10001 --gid acs --home-dir /app --no-create-home --shell /usr/sbin/nologin acs
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Baked-in weights (one sub-folder per model); mount another folder over /app/weights to
# serve other ones. The folder may hold no checkpoint: the server then never gets ready.
COPY --from=weights /weights/ /app/weights/
# MALLOC_ARENA_MAX=2: fewer glibc arenas keep less freed memory (as in bench/soak.py's runs)
ENV PATH=/opt/venv/bin:$PATH \
    MALLOC_ARENA_MAX=2 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    OMP_NUM_THREADS=1 \
    ACS_HOST=0.0.0.0 \
    ACS_PORT=8000 \
    ACS_WEIGHTS_DIR=/app/weights \
    ACS_DEVICE=auto \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 8000
# Healthy = ready: models loaded and warmed up, not draining (/readyz answers 503 otherwise).
# Liveness alone is /healthz; orchestrators probe both (see deploy/k8s).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; port = os.environ.get('ACS_PORT', '8000'); sys.exit(u.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2).status != 200)"]
# SIGTERM: readiness fails at once, in-flight requests finish (up to 60 s), then exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
