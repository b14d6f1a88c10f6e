# The mpu-janitor operator image: the package and its dependencies on a slim Python, nothing else.
#   docker build -t mpu-janitor \
#     --build-arg REVISION="$(git rev-parse HEAD)" --build-arg CREATED="$(date -u +%FT%TZ)" .
#   docker run --rm mpu-janitor sweep -f policy.yaml --dry-run   (the default command: operator)
# Without a Docker daemon: scripts/build-image.sh (buildah); --debian-base where no container
# registry is reachable.
#
# The base image of both stages. For a reproducible release build, pin it by digest:
# scripts/pin-base-image.sh looks the tag's digest up (skopeo) and rewrites this line to
# python:3.11-slim@sha256:<digest>; commit the result and refresh it for security updates.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# Set by the release build; VERSION follows pyproject.toml and the chart's appVersion.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="mpu-janitor" \
      org.opencontainers.image.description="Kubernetes operator that aborts stale incomplete multipart uploads and proves the storage is freed" \
      org.opencontainers.image.source="https://github.com/mpu-janitor/mpu-janitor" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A passwd entry for the numeric user, so getpass and botocore can name it.
RUN groupadd --system --gid 65532 mpu-janitor \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mpu-janitor
COPY --from=build /wheels /wheels
# The dependencies at the versions the tests ran with (the lock is a superset: constraints only).
COPY requirements/test.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --constraint /tmp/constraints.txt /wheels/*.whl \
 && rm -rf /wheels /tmp/constraints.txt
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["mpu-janitor"]
CMD ["operator"]
