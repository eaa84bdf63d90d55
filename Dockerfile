# One image for the API and every worker. The GPU stage installs CUDA torch:
#   docker build -t likeness .                                  (CPU torch: API, CPU worker)
#   docker build -t likeness-gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# libGL/glib for OpenCV/mediapipe; libheif comes with pillow-heif wheels.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 likeness
WORKDIR /srv/likeness

FROM base AS deps
# torch first from the chosen index (CPU by default, CUDA via build arg), then the rest from PyPI.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX} torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml ./
# Install only the dependencies (a stub package) so code edits do not bust this layer.
RUN mkdir -p app worker pipelines && touch app/__init__.py worker/__init__.py pipelines/__init__.py \
 && pip install . flower && pip uninstall -y likeness && rm -rf app worker pipelines build

FROM deps AS runtime
COPY alembic.ini ./
COPY migrations ./migrations
COPY pipelines ./pipelines
COPY worker ./worker
COPY app ./app
RUN pip install --no-deps -e . \
 && mkdir -p /data /models && chown likeness:likeness /data /models
USER likeness
ENV LIKENESS_DATA_DIR=/data LIKENESS_MODEL_CACHE_DIR=/data/models HF_HOME=/data/hf LIKENESS_HOST=0.0.0.0
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD curl -fsS http://localhost:8000/healthz || exit 1
# API by default; workers override the command (see docker-compose.yml).
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
