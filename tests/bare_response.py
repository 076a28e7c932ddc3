"""An aiohttp response for canned test upstreams that adds nothing of its own."""

from __future__ import annotations

from aiohttp import hdrs, web


class BareResponse(web.StreamResponse):
    """A StreamResponse that adds nothing: aiohttp would supply Date, Server and a default
    Content-Type, which a model server may not send (TorchServe sends no Content-Type)."""

    async def _prepare_headers(self) -> None:
        absent = [
            name for name in (hdrs.DATE, hdrs.SERVER, hdrs.CONTENT_TYPE) if name not in self.headers
        ]
        await super()._prepare_headers()
        for name in absent:
            self.headers.popall(name, None)
