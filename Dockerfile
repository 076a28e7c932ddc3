# The sidecar image: `docker run IMAGE --upstream http://model:9000 --preset kserve-v1`.
# The same image runs the bundled toy model for the demo (entrypoint `sidecar demo-model`).
#
# Two stages. `build` makes a virtualenv from requirements.lock (the pinned runtime dependencies
# of `sidecar serve`) and the sidecar's own package, compiled; the image copies that virtualenv
# alone: no source tree, pip cache, compiler or build tools, and none of what `sidecar profile
# build` needs (pyarrow: the `profile` extra, for the machine where profiles are built). To
# change a dependency, edit pyproject.toml, then regenerate requirements.lock as its header says
# (docs/deploy.md, section 3, "The image").

FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/sidecar

# Dependencies first, so that this layer is rebuilt only when the lock changes. Every pin has a
# wheel for this Python (--only-binary: nothing is compiled), --no-deps installs exactly the lock,
# and pip check fails the build if the lock is not a complete, consistent set.
COPY requirements.lock /tmp/requirements.lock
RUN /opt/sidecar/bin/pip install --only-binary=:all: --no-deps -r /tmp/requirements.lock \
    && /opt/sidecar/bin/pip check

# The sidecar itself, compiled (setup.py, SIDECAR_MYPYC=1): mypyc turns the modules a request
# runs through into C extensions, which cost less CPU per request (README.md, "The compiled
# build"). mypyc type-checks what it compiles, so a throwaway virtualenv holds the lock, mypy and
# the stubs it reads; the compiler and that virtualenv stay in this stage, and the image gets the
# wheel alone, installed without its dependencies: the lock holds them, less the profile extra.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --only-binary=:all: --no-deps -r /tmp/requirements.lock \
    && /opt/build/bin/pip install 'setuptools>=77' mypy==2.4.1 types-PyYAML==6.0.12.20261122 \
        types-jmespath==1.1.0.20260724 types-protobuf==7.35.1.20261122
WORKDIR /tmp/build
COPY pyproject.toml setup.py README.md ./
COPY src ./src
RUN SIDECAR_MYPYC=1 /opt/build/bin/pip wheel --no-build-isolation --no-deps -w /tmp/wheels . \
    && /opt/sidecar/bin/pip install --no-deps /tmp/wheels/sidecar-*.whl


FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/sidecar/bin:$PATH

# The virtualenv links to this same base image's Python.
COPY --from=build /opt/sidecar /opt/sidecar

# A fixed, unprivileged user: Kubernetes' runAsNonRoot can check the numeric id.
RUN useradd --system --uid 10001 --user-group --home-dir /home/sidecar --create-home \
        --shell /usr/sbin/nologin sidecar
USER 10001:10001
WORKDIR /home/sidecar

# 8080: proxy port (model traffic). 9101: admin port (/metrics, /healthz, /readyz). A gRPC port,
# when configured (grpc_port), is the deployment's choice: deploy/kubernetes uses 8091.
EXPOSE 8080 9101

# /healthz says the process is alive (not whether the model is ready: that is /readyz).
# The image has no curl; Python's standard library does the probe.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9101/healthz', timeout=2)"]

ENTRYPOINT ["sidecar", "serve"]
