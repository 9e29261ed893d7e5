# Clearsight on a CPU: `docker build -t clearsight .` then see compose.yaml (or README, "Docker").
# Weights are not baked in: mount them under /models (or let the container download them into the
# Hugging Face cache there); the collection (catalog, index, caches) lives in the /data volume.
# BASE and TORCH_INDEX can be overridden for offline builds (a locally built Debian base, a local wheel index).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# DL3064 is a false alarm: TOKENIZERS_PARALLELISM is a switch of the tokenizers library, not a secret.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CLEARSIGHT_DATA_DIR=/data \
    HF_HOME=/models/huggingface \
    TOKENIZERS_PARALLELISM=false

RUN groupadd --system --gid 10001 clearsight \
    && useradd --system --uid 10001 --gid clearsight --create-home --home-dir /home/clearsight clearsight \
    && mkdir -p /data /models \
    && chown clearsight:clearsight /data /models

WORKDIR /opt/clearsight
COPY pyproject.toml README.md ./
COPY retrieval ./retrieval
COPY explainer ./explainer
COPY templates ./templates
COPY prompts ./prompts
COPY models/registry.toml ./models/registry.toml

# torch from PyTorch's CPU wheel index first: the default PyPI wheel is a multi-GB CUDA build.
# Then the project itself, whose pins (pyproject.toml) name the same torch version.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==2.13.0" \
    && pip install --no-cache-dir . \
    && clearsight --help > /dev/null

USER 10001:10001
WORKDIR /home/clearsight
VOLUME ["/data", "/models"]
EXPOSE 8000

# /api/health answers 200 once the index and model are loaded, 503 with the reason before.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/api/health', timeout=4).status != 200)"]

# Listening on every interface inside the container: set CLEARSIGHT_API_TOKEN so that only
# clients holding the token can search (the compose file refuses to start without it).
CMD ["clearsight", "serve", "--host", "0.0.0.0", "--port", "8000"]
