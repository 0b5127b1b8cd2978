# syntax=docker/dockerfile:1
# Inference API (FastAPI, port 8000): loads the production models from CTSCAN_MODEL_STORE.
# Build from the repository root:  docker build -f docker/inference.Dockerfile -t ctscan-inference:0.1.0 .

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
RUN python docker/requirements.py --variant cpu --extra inference pyproject.toml > requirements.txt \
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
    TF_CPP_MIN_LOG_LEVEL=2 \
    CTSCAN_MODEL_STORE=/data/model-store
WORKDIR /home/ctscan
USER 10001:10001
EXPOSE 8000
# /readyz answers 503 until the models are loaded and warmed: a slow start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/opt/ctscan/healthcheck.py", "http", "http://127.0.0.1:8000/readyz"]
CMD ["ctscan", "serve", "inference", "--host", "0.0.0.0", "--port", "8000"]
