"""``python -m imbot.simulator --port … --gateway-url … --secret …``: run the Easemob simulator."""

from __future__ import annotations

import argparse
import sys

from aiohttp import web

from imbot.simulator.app import SimulatorConfig, create_app


def parse_config(argv: list[str] | None = None) -> SimulatorConfig:
    parser = argparse.ArgumentParser(
        prog="python -m imbot.simulator", description="local Easemob REST API and callback firer"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8080/easemob/callback")
    parser.add_argument("--secret", default="dev-callback-secret", help="callback rule secret")
    parser.add_argument("--org", default="demo-org")
    parser.add_argument("--app", default="demo-app")
    parser.add_argument("--client-id", default="dev-client")
    parser.add_argument("--client-secret", default="dev-client-secret")
    parser.add_argument("--token-ttl", type=int, default=3600, help="expires_in of tokens (s)")
    parser.add_argument("--max-message-bytes", type=int, default=5 * 1024)
    parser.add_argument("--oversize-status", type=int, choices=(400, 413), default=400)
    parser.add_argument("--rate-limit", type=float, default=None, help="sends/s before 429")
    args = parser.parse_args(argv)
    return SimulatorConfig(
        port=args.port,
        host=args.host,
        org=args.org,
        app=args.app,
        client_id=args.client_id,
        client_secret=args.client_secret,
        token_ttl_s=args.token_ttl,
        gateway_url=args.gateway_url,
        secret=args.secret,
        max_message_bytes=args.max_message_bytes,
        oversize_status=args.oversize_status,
        rate_limit=args.rate_limit,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    print(
        f"easemob simulator on http://{config.host}:{config.port} "
        f"(app {config.org}#{config.app}, callbacks to {config.gateway_url})",
        file=sys.stderr,
        flush=True,
    )
    web.run_app(create_app(config), host=config.host, port=config.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
