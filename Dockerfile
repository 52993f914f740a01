# syntax=docker/dockerfile:1
# The mailbeat backend. The default command serves the API; docker-compose.yml runs the
# migrations, Celery beat, the workers and Flower from this same image with their own
# commands. No secret is baked in: settings come from the environment (compose's .env).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Builds behind a proxy that re-signs TLS, or with a private index (docker-compose.yml
# passes them from the shell): pip's index, and CA certificates (PEM text) added to the
# image's trust store, which pip is pointed at. Empty, pip uses PyPI and the usual CAs.
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ARG EXTRA_CA_CERTS=""

# Dependencies in their own layer, so a code change does not reinstall them.
COPY requirements.txt ./
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/build-extra.crt \
      && update-ca-certificates; \
    fi \
 && PIP_CERT=/etc/ssl/certs/ca-certificates.crt pip install -r requirements.txt

# The code stays root-owned (the service cannot change it); only /app/data is writable:
# local-fallback objects and metrics files, a volume shared by the API and the workers.
# A named volume mounted there starts with this ownership.
RUN groupadd --system --gid 10001 mailbeat \
 && useradd --system --uid 10001 --gid mailbeat --home-dir /app/data --shell /usr/sbin/nologin mailbeat \
 && mkdir -p /app/data \
 && chown mailbeat:mailbeat /app/data

COPY alembic.ini ./
COPY alembic ./alembic
COPY backend ./backend

USER mailbeat
EXPOSE 8000
CMD ["uvicorn", "backend.main:app", "--host", "0.0.0.0", "--port", "8000", "--http", "backend.serving:BoundedHttpProtocol"]
