"""HTTP/1.1 spoken by hand over raw sockets: for bytes a normal client would refuse to send, and
for reading answers exactly as they came."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Response = tuple[bytes, list[tuple[bytes, bytes]], bytes]


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One response: status line, headers as sent, body (by length, chunks or close)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    status_line, *lines = head[:-4].split(b"\r\n")
    headers = [(name, value) for name, _, value in (line.partition(b": ") for line in lines)]
    named = {name.lower(): value for name, value in headers}
    if b"content-length" in named:
        body = await reader.readexactly(int(named[b"content-length"]))
    elif named.get(b"transfer-encoding") == b"chunked":
        pieces = []
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            pieces.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readexactly(2)
        body = b"".join(pieces)
    elif status_line.split(b" ")[1] in (b"204", b"304"):
        body = b""
    else:
        body = await asyncio.wait_for(reader.read(), timeout=10)
    return status_line, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the other side closed the connection (EOF within a generous wait)."""
    return await asyncio.wait_for(reader.read(1), timeout=10) == b""


def post(path: str, body: bytes, *extra: bytes) -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % (path.encode(), len(body))
    return head + b"".join(line + b"\r\n" for line in extra) + b"\r\n" + body


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """An upstream on an ephemeral port whose every connection is served by `serve`, a script
    over the raw streams; `ended` is set when a connection's script has returned."""

    def __init__(self, serve: Serve) -> None:
        self._serve = serve
        self.url = ""
        self.ended = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._run, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()
            self.ended.set()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """A request's head, blank line included."""
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
