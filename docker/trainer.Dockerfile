# syntax=docker/dockerfile:1
# Trainer worker (Celery, CPU TensorFlow): runs training jobs from the Redis queue and writes
# versions to CTSCAN_MODEL_STORE. Also runs the compose `seed` job (docker/seed.py).
# GPU hosts use docker/trainer-cuda.Dockerfile instead.
# Build from the repository root:  docker build -f docker/trainer.Dockerfile -t ctscan-trainer:0.1.0 .

# --- builder: a virtualenv with the pinned dependencies, then the project ---------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (pins come from pyproject.toml), so code changes reuse these layers.
COPY pyproject.toml requirements.lock ./
COPY docker/requirements.py docker/requirements.py
# The ML stack (TensorFlow, ONNX) first, in a layer that the inference and trainer images
# share: the same steps give the same cached layer, so it is built once. Transitive pins
# come from requirements.lock.
RUN python docker/requirements.py --variant cpu --extra ml pyproject.toml > ml.txt \
    && pip install --constraint requirements.lock --requirement ml.txt
RUN python docker/requirements.py --variant cpu --extra trainer pyproject.toml > requirements.txt \
    && pip install --constraint requirements.lock --requirement requirements.txt
COPY README.md ./
COPY ctscan ctscan
COPY services services
RUN pip install --no-deps .

# --- runtime: slim base, the virtualenv, a non-root user --------------------------------
FROM python:3.11-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 ctscan \
    && useradd --system --uid 10001 --gid ctscan --home-dir /home/ctscan --create-home \
       --shell /usr/sbin/nologin ctscan \
    && mkdir -p /data/model-store /data/runs /data/datasets /data/trainer \
    && chown -R ctscan:ctscan /data
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py docker/seed.py /opt/ctscan/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    CTSCAN_MODEL_STORE=/data/model-store \
    CTSCAN_RUNS_DIR=/data/runs \
    CTSCAN_DATA_DIR=/data/datasets/ucsd-covid-ct \
    CTSCAN_RELEASE_DIR=/app/models \
    CTSCAN_TRAINER_WORK_DIR=/data/trainer
WORKDIR /home/ctscan
USER 10001:10001
# Healthy when this container's worker answers a Celery ping over the broker.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/opt/ctscan/healthcheck.py", "worker"]
CMD ["ctscan", "serve", "worker", "--concurrency", "1"]
