# syntax=docker/dockerfile:1
# Trainer worker for NVIDIA GPU hosts (EC2 g4dn/g5/g6, any CUDA 12 capable driver). The GPU
# override (docker-compose.gpu.yml) also runs the inference service from this image.
#
# Why a python slim base and not nvidia/cuda: `tensorflow[and-cuda]` installs CUDA, cuDNN and
# NCCL as pip wheels pinned to exactly the versions that TensorFlow release was built
# against, so a CUDA base image would only duplicate (and risk mismatching) them, and the
# Ubuntu-based CUDA images ship Python 3.10, not the 3.11 this project requires. The host
# needs only the NVIDIA driver and the NVIDIA Container Toolkit.
# Build from the repository root:
#   docker build -f docker/trainer-cuda.Dockerfile -t ctscan-trainer-cuda:0.1.0 .

# --- builder: a virtualenv with the pinned dependencies (GPU TensorFlow), then the project
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml requirements.lock ./
COPY docker/requirements.py docker/requirements.py
# The ML stack (TensorFlow, ONNX) first, in a layer that the inference and trainer images
# share: the same steps give the same cached layer, so it is built once. Transitive pins
# come from requirements.lock.
RUN python docker/requirements.py --variant cuda --extra ml pyproject.toml > ml.txt \
    && pip install --constraint requirements.lock --requirement ml.txt
RUN python docker/requirements.py --variant cuda --extra trainer --extra inference pyproject.toml > requirements.txt \
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
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CTSCAN_MODEL_STORE=/data/model-store \
    CTSCAN_RUNS_DIR=/data/runs \
    CTSCAN_DATA_DIR=/data/datasets/ucsd-covid-ct \
    CTSCAN_RELEASE_DIR=/app/models \
    CTSCAN_TRAINER_WORK_DIR=/data/trainer
WORKDIR /home/ctscan
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/opt/ctscan/healthcheck.py", "worker"]
CMD ["ctscan", "serve", "worker", "--concurrency", "1"]
