# adapter-serving image: the HTTP service with the embedded SmolLM2-135M-Instruct baked in (serves with no
# network). It installs through `make install`, the same target the README and `make test` use, so the image
# cannot drift from what the tests install; the Makefile is the one place that names packages and versions.
#
#   docker build -t adapter-serving:cpu .                                                   (CPU, small)
#   docker build -t adapter-serving:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The CUDA wheel brings its own CUDA runtime; the host needs only the NVIDIA driver and container toolkit.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# Which torch build `make install` takes: the CPU wheels by default, a CUDA index for the GPU image.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group serve

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY adapters_core ./adapters_core
COPY service ./service
RUN make install VENV=/opt/venv PYTHON=python3 TORCH_INDEX="${TORCH_INDEX}"

# The adapter store lives on a volume so uploads survive the container; it is scanned at start-up.
RUN mkdir -p /data/adapters && chown serve:serve /data/adapters
VOLUME /data/adapters

ENV PATH=/opt/venv/bin:$PATH \
    ADAPTER_SERVE_HOST=0.0.0.0 \
    ADAPTER_SERVE_PORT=8000 \
    ADAPTER_SERVE_ADAPTER_DIR=/data/adapters

USER serve
EXPOSE 8000

# uvicorn answers only once the lifespan has loaded the model, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ADAPTER_SERVE_PORT', '8000'), timeout=4)"]

CMD ["adapter-serve"]
