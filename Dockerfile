# The envpipe workers: `docker run IMAGE encrypt --source ... --dest ... --group ...`.
# Stage 1 builds the wheel, so the runtime image holds neither the source nor the build tools.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# What the hatchling wheel build reads: pyproject (with `readme`), the packages, the schemas.
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY pipeline/ pipeline/
COPY workers/ workers/
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# The runtime dependencies only (no dev or bench extras); every one has a manylinux wheel.
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
RUN groupadd --system --gid 10001 envpipe \
    && useradd --system --uid 10001 --gid envpipe --no-create-home --shell /usr/sbin/nologin envpipe
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# ENVPIPE_METRICS_PORT, when set, serves Prometheus metrics here by convention.
EXPOSE 9400
ENTRYPOINT ["envpipe"]
CMD ["--help"]
