# syntax=docker/dockerfile:1
# Hookline image (the worker, the API and their operator commands): `docker build -t hookline .`
#   docker run -v $PWD/config.yaml:/etc/hookline/config.yaml:ro -p 9100:9100 hookline
# The config is read from /etc/hookline/config.yaml (CMD below); secrets come from the
# environment (HOOKLINE_BROKER_URL, each endpoint's secret_env, and with the registry
# HOOKLINE_DATABASE_URL and HOOKLINE_SECRET_KEY). The same image runs the operator commands:
#   docker run ... hookline dlq list --config /etc/hookline/config.yaml
# and the control plane (the API, its migrations and keys), with python as the entrypoint:
#   docker run ... --entrypoint python hookline -m api --config /etc/hookline/config.yaml migrate
#   docker run ... --entrypoint python -p 8080:8080 hookline -m api --config /etc/hookline/config.yaml
# (the API listens on api.host:api.port, 8080; the HEALTHCHECK below asks the worker's port,
# so give the API container a check of its own on /readyz, as deploy/docker-compose.yml does).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/hookline
WORKDIR /src
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
# The API package with its SQL migrations (package data: api/migrations/*.sql).
COPY api ./api
RUN /opt/hookline/bin/pip install .

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="hookline" \
      org.opencontainers.image.description="Webhook delivery on RabbitMQ" \
      org.opencontainers.image.source="https://github.com/hookline/hookline"
RUN groupadd --system --gid 10001 hookline \
    && useradd --system --uid 10001 --gid hookline --no-create-home --shell /usr/sbin/nologin hookline
COPY --from=build /opt/hookline /opt/hookline
ENV PATH=/opt/hookline/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# metrics.port: /metrics, /healthz, /readyz and the status page; 8080 is the API's api.port.
EXPOSE 9100 8080
# slim images have no curl; the standard library asks /healthz (metrics.port 9100).
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "worker"]
CMD ["run", "--config", "/etc/hookline/config.yaml"]

# The example receiver (examples/receiver), for docker-compose and trying things out.
FROM runtime AS receiver
USER root
RUN /opt/hookline/bin/pip install --no-cache-dir "standardwebhooks>=1.0.0"
COPY examples/receiver/app.py /opt/receiver/app.py
USER 10001:10001
EXPOSE 8765
HEALTHCHECK NONE
ENTRYPOINT ["python", "/opt/receiver/app.py"]
CMD ["--host", "0.0.0.0", "--port", "8765"]

# Last, so that a plain `docker build .` produces the worker image.
FROM runtime
