# syntax=docker/dockerfile:1
# Web front end (Flask, port 8080): upload form, result pages and the admins' console; calls
# INFERENCE_URL and queues training jobs on the trainer's broker. No TensorFlow in this image.
# Build from the repository root:  docker build -f docker/web.Dockerfile -t ctscan-web:0.1.0 .

# --- builder: a virtualenv with the pinned dependencies, then the project ---------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (pins come from pyproject.toml), so code changes reuse this layer.
COPY pyproject.toml requirements.lock ./
COPY docker/requirements.py docker/requirements.py
# The `web` extra only: Flask, the inference client, and the Celery/Redis clients that queue
# training jobs. No TensorFlow or ONNX (the page holds no model). Transitive pins come from
# requirements.lock.
RUN python docker/requirements.py --variant cpu --extra web pyproject.toml > requirements.txt \
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
    && mkdir -p /data/model-store /data/audit \
    && chown -R ctscan:ctscan /data
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/ctscan/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INFERENCE_URL=http://inference:8000
WORKDIR /home/ctscan
USER 10001:10001
EXPOSE 8080
# The web service holds no models; it is healthy as soon as it answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/ctscan/healthcheck.py", "http", "http://127.0.0.1:8080/healthz"]
CMD ["ctscan", "serve", "web", "--host", "0.0.0.0", "--port", "8080"]
