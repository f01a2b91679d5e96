# Arize Phoenix, the trace viewer of the compose cluster, built from the package index
# (no image registry needed). Same BASE_IMAGE and extra CA certificates as docker/Dockerfile.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PHOENIX_VERSION=20.26.1
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/phoenix/bin:$PATH \
    PHOENIX_WORKING_DIR=/data
COPY docker/ca-certificates/ /usr/local/share/ca-certificates/pdserve/
COPY docker/trust-extra-ca.sh /usr/local/bin/
RUN trust-extra-ca.sh && python3 -m venv /opt/phoenix && pip install arize-phoenix==${PHOENIX_VERSION}
RUN useradd --system --uid 10002 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin phoenix \
    && mkdir -p /data && chown phoenix:phoenix /data
USER phoenix
EXPOSE 6006 4317
HEALTHCHECK --interval=2s --timeout=3s --retries=60 \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:6006/healthz', timeout=2)"
CMD ["phoenix", "serve"]
