# Three images from one file, each installed from the lock (constraints.txt) into /opt/venv:
#   docker build --target api    -t likeness-api .     API, migrations, beat, Flower: no torch (~300 MB)
#   docker build --target worker -t likeness-worker .  GPU and CPU workers: the ML stack (CUDA torch from the lock)
#   docker build --target bot    -t likeness-bot .     the Telegram bot
# No Docker daemon runs where the tests run: tests/deploy/test_image.py builds each target's file tree the
# way its COPY steps say, runs its `pip` RUN steps into an empty virtualenv and starts the compose services'
# commands from it. Keep every `pip` step relative to WORKDIR and inside the venv (PATH) so that it can.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# /data and /models belong to the service's user, so that volumes mounted there are writable.
RUN python -m venv /opt/venv && useradd --create-home --uid 10001 likeness \
 && mkdir -p /data /models && chown likeness:likeness /data /models
WORKDIR /srv/likeness
# Dependencies first, from the lock and the project's metadata alone, so that code edits keep this layer.
COPY pyproject.toml constraints.txt ./

# Every room's code: app imports core and likeness.contract, the contract imports pipelines' data types,
# `likeness` is likeness_cli, and core.db.migrate reads alembic.ini and migrations/ beside the packages.
FROM base AS code
COPY alembic.ini ./
COPY migrations ./migrations
COPY core ./core
COPY likeness ./likeness
COPY likeness_cli ./likeness_cli
COPY pipelines ./pipelines
COPY app ./app
COPY worker ./worker

FROM base AS api-deps
RUN pip install -c constraints.txt ".[api,ops]"

FROM base AS worker-deps
# libGL and glib for OpenCV and MediaPipe.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
RUN pip install -c constraints.txt ".[worker]"

FROM base AS bot-deps
RUN pip install -c constraints.txt ".[bot]"

# The API, `likeness migrate`, `likeness beat` and Flower (docker-compose.yml, deploy/kubernetes/).
FROM api-deps AS api
COPY --from=code /srv/likeness ./
RUN pip install --no-deps -e .
USER likeness
ENV LIKENESS_DATA_DIR=/data LIKENESS_HOST=0.0.0.0
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD ["likeness", "health", "http", "http://127.0.0.1:8000/healthz"]
# Forwarded headers believed from nobody (as LIKENESS_FORWARDED_ALLOW_IPS unset does for `likeness serve`); behind a
# reverse proxy: --proxy-headers --forwarded-allow-ips <its address>.
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--no-proxy-headers"]

# GPU and CPU workers: `likeness worker --queues gpu|cpu`.
FROM worker-deps AS worker
COPY --from=code /srv/likeness ./
RUN pip install --no-deps -e .
USER likeness
ENV LIKENESS_DATA_DIR=/data LIKENESS_MODEL_CACHE_DIR=/data/models HF_HOME=/data/hf
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s CMD ["likeness", "health", "worker"]
CMD ["likeness", "worker", "--queues", "gpu", "--concurrency", "1"]

FROM bot-deps AS bot
COPY --from=code /srv/likeness ./
RUN pip install --no-deps -e .
USER likeness
HEALTHCHECK --interval=30s --timeout=5s CMD ["likeness", "health", "bot"]
CMD ["likeness", "bot"]
