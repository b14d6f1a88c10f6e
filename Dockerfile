# The mpu-janitor operator image: the package and its dependencies on a slim Python, nothing else.
#   docker build -t mpu-janitor .
#   docker run --rm mpu-janitor sweep -f policy.yaml --dry-run   (the default command: operator)

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
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
