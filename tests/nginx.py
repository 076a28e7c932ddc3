"""A real nginx (Debian's package) as the upstream, for behaviour that needs a real HTTP server
on the other side: it answers every request with its method and target, so a reply shows which
request it belongs to."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_CONFIG = """
daemon off;
master_process on;  # off, nginx 1.22 crashes on an inherited socket
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "$request_method $request_uri\\n"; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_echoing_targets() -> Iterator[str]:
    """nginx on an ephemeral port; yields its URL. The listening socket is bound here (port 0)
    and handed to nginx as an inherited socket (the NGINX variable of its binary upgrade), so
    there is no race for the port and no wait for it to listen."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.fail("nginx is missing: ./scripts/test installs Debian's nginx")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="sidecar-nginx-") as directory:
        config = Path(directory, "nginx.conf")
        config.write_text(_CONFIG.format(dir=directory, port=port))
        process = subprocess.Popen(
            [binary, "-c", str(config), "-e", f"{directory}/error.log"],
            env={**os.environ, "NGINX": f"{listener.fileno()};"},
            pass_fds=[listener.fileno()],
        )
        listener.close()  # nginx has its own copy now
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=10)
