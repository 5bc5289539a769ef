# The frontends' image: `brigade bot` and `brigade api`, no torch. Build from the
# repository root:
#   docker build -f compose/Dockerfile.app -t brigade-app .
# The command picks the service: CMD ["brigade", "api"] (the default) or ["brigade", "bot"].
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BRIGADE_DATA_DIR=/data \
    API_HOST=0.0.0.0 \
    API_PORT=8080 \
    DISCORD_HEALTH_PORT=9102

WORKDIR /src
COPY pyproject.toml README.md ./
COPY jobs/ jobs/
COPY workflows/ workflows/
COPY storage/ storage/
COPY renderer/ renderer/
COPY bot/ bot/
COPY api/ api/
COPY brigade/ brigade/
# DL3013 wants every pip package pinned: this installs our own project (".") whose
# dependencies are the ranges pyproject.toml declares; the repository has no lock file.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[bot]" \
    && rm -rf /src/build

RUN useradd --no-log-init -l -m -u 10001 -s /usr/sbin/nologin brigade \
    && mkdir -p /data \
    && chown brigade:brigade /data
USER 10001:10001
WORKDIR /home/brigade
EXPOSE 8080

# The API's /healthz; compose gives the bot its own (DISCORD_HEALTH_PORT).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('API_PORT') or '8080'), timeout=5)"]

CMD ["brigade", "api"]
