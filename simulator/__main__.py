"""``python -m simulator --port … --gateway-url … --secret …``: run the Easemob simulator."""

from __future__ import annotations

import argparse

from aiohttp import web

from simulator.app import SimulatorConfig, create_app


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulator", description="local Easemob simulator"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8080/easemob/callback")
    parser.add_argument("--secret", default="dev-callback-secret")
    parser.add_argument("--org", default="demo-org")
    parser.add_argument("--app", default="demo-app")
    parser.add_argument("--client-id", default="dev-client")
    parser.add_argument("--client-secret", default="dev-client-secret")
    parser.add_argument("--token-ttl", type=int, default=3600)
    args = parser.parse_args()
    config = SimulatorConfig(
        port=args.port,
        host=args.host,
        org=args.org,
        app=args.app,
        client_id=args.client_id,
        client_secret=args.client_secret,
        token_ttl_s=args.token_ttl,
        gateway_url=args.gateway_url,
        secret=args.secret,
    )
    web.run_app(create_app(config), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
