"""Baseline for the gateway benchmark: bare aiohttp that parses the same body and answers the same JSON."""

from __future__ import annotations

import sys

import orjson
from aiohttp import web

_VALID = orjson.dumps({"valid": True})


async def handle(request: web.Request) -> web.Response:
    orjson.loads(await request.read())
    return web.Response(body=_VALID, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/easemob/callback", handle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
