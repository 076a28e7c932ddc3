# The sidecar image: `docker run IMAGE --upstream http://model:9000 --preset kserve-v1`.
# The same image runs the bundled toy model for the demo (entrypoint `sidecar demo-model`).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install from the source tree, then drop it: only the installed package stays in the image.
WORKDIR /tmp/build
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && rm -rf /tmp/build

# A fixed, unprivileged user: Kubernetes' runAsNonRoot can check the numeric id.
RUN useradd --system --uid 10001 --user-group --home-dir /home/sidecar --create-home \
        --shell /usr/sbin/nologin sidecar
USER 10001:10001
WORKDIR /home/sidecar

# 8080: proxy port (model traffic). 8081: admin port (/metrics, /healthz, /readyz).
EXPOSE 8080 8081

# /healthz says the process is alive (not whether the model is ready: that is /readyz).
# The image has no curl; Python's standard library does the probe.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2)"]

ENTRYPOINT ["sidecar", "serve"]
