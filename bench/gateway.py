"""Gateway throughput and latency vs a bare aiohttp handler, in the same run.

Both servers get the same signed AI-message callback body, with a unique msg_id
per request from a different user each time (many conversations, as in production;
one conversation would serialise on one partition). The gateway does everything it does in production: body limit, JSON,
MD5 signature, AI decision, envelope, and a publish to the embedded broker that
waits for acks=all. Load: wrk (closed loop, max throughput) and ``bench.loadgen``
(open loop at 2,000 requests/s, latency from the scheduled send time).

    python -m bench.gateway
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.report import write_section
from core.kafka import EmbeddedBroker, free_port
from core.signature import expected_security

SECRET = "bench-secret"
CONNECTIONS = 32
DURATION = 10
RATE = 2000
GW_BATCHED = "imbot gateway (normal batching, as on a real cluster)"
GW_SINGLE = "imbot gateway (one record per batch, embedded workaround)"


def body_template() -> str:
    call_id = "benchorg#benchapp_0990a64f-6c50-8696-cf3b48b20e7e"
    ts = int(time.time() * 1000)
    data = {
        "callId": call_id,
        "timestamp": ts,
        "chat_type": "chat",
        "from": "MSGID",
        "to": "ai_bot",
        "msg_id": "MSGID",
        "payload": {"bodies": [{"type": "txt", "msg": "你好，请介绍一下你自己"}], "ext": {}},
        "security": expected_security(call_id, SECRET, ts),
    }
    return json.dumps(data, ensure_ascii=False)


WRK_SCRIPT = """
local counter = 0
local template = [[%s]]
local tid = 0
setup = function(thread) tid = tid + 1; thread:set("tid", tid) end
request = function()
  counter = counter + 1
  local body = template:gsub("MSGID", tostring(tid or 0) .. "00000" .. tostring(counter))
  return wrk.format("POST", "/easemob/callback", {["Content-Type"] = "application/json"}, body)
end
"""


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def run_wrk(port: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{DURATION}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def run_loadgen(port: int, body_file: Path) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable, "-m", "bench.loadgen",
            "--url", f"http://127.0.0.1:{port}/easemob/callback",
            "--body-file", str(body_file),
            "--rate", str(RATE), "--duration", str(DURATION),
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def published_count(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    m = re.search(r'imbot_gateway_callbacks_total\{outcome="published"\} ([\d.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def main() -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    tmp = Path(tempfile.mkdtemp())
    template = body_template()
    body_file = tmp / "body.json"
    body_file.write_text(template, encoding="utf-8")
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT % template, encoding="utf-8")

    with EmbeddedBroker() as broker:
        ports = {"bare aiohttp": free_port(), GW_BATCHED: free_port(), GW_SINGLE: free_port()}
        env = {
            **os.environ,
            "IMBOT_KAFKA_BOOTSTRAP": broker.bootstrap,
            "IMBOT_KAFKA_EMBEDDED": "true",
            "IMBOT_CALLBACK_SECRETS": SECRET,
            "IMBOT_LOG_LEVEL": "WARNING",
        }
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.bare_server", str(ports["bare aiohttp"])]
            ),
            subprocess.Popen(
                [sys.executable, "-m", "core.cli", "gateway"],
                env={
                    **env,
                    "IMBOT_GATEWAY_PORT": str(ports[GW_BATCHED]),
                    "IMBOT_KAFKA_SINGLE_RECORD_BATCHES": "false",
                },
            ),
            subprocess.Popen(
                [sys.executable, "-m", "core.cli", "gateway"],
                env={
                    **env,
                    "IMBOT_GATEWAY_PORT": str(ports[GW_SINGLE]),
                    "IMBOT_KAFKA_SINGLE_RECORD_BATCHES": "true",
                },
            ),
        ]
        try:
            wait_http(f"http://127.0.0.1:{ports[GW_BATCHED]}/readyz")
            wait_http(f"http://127.0.0.1:{ports[GW_SINGLE]}/readyz")
            time.sleep(1.0)  # the bare server has no GET route; give it a moment to bind
            results: dict[str, dict[str, dict[str, float]]] = {}
            for name, port in ports.items():
                results[name] = {
                    "wrk": run_wrk(port, script),
                    "fixed": run_loadgen(port, body_file),
                }
                time.sleep(1)
            published = published_count(ports[GW_BATCHED]) + published_count(ports[GW_SINGLE])
        finally:
            for p in procs:
                p.terminate()
                p.wait()

    bare, gw, single = results["bare aiohttp"], results[GW_BATCHED], results[GW_SINGLE]
    lines = [
        f"Closed loop: wrk, 1 thread, {CONNECTIONS} connections, {DURATION} s. "
        f"Open loop: `bench.loadgen` at {RATE} requests/s for {DURATION} s, latency from the scheduled send time.",
        "",
        "| server | wrk req/s | vs bare | wrk p50 ms | wrk p99 ms | @2,000/s achieved | @2,000/s p50 ms | @2,000/s p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['wrk']['rps']:,.0f} | {r['wrk']['rps'] / bare['wrk']['rps']:.0%} | "
            f"{r['wrk']['p50']:.2f} | {r['wrk']['p99']:.2f} | "
            f"{r['fixed']['rate']:,.0f} | {r['fixed']['p50']:.2f} | {r['fixed']['p99']:.2f} | "
            f"{int(r['wrk']['non2xx'] + r['fixed']['errors'])} |"
        )
    lines += [
        "",
        f"Targets: throughput ≥ 50% of bare aiohttp — **{gw['wrk']['rps'] / bare['wrk']['rps']:.0%}** with normal "
        f"batching, **{single['wrk']['rps'] / bare['wrk']['rps']:.0%}** with the embedded broker's one-record batches; "
        f"p99 < 10 ms at 2,000/s — **{gw['fixed']['p99']:.2f} ms** / **{single['fixed']['p99']:.2f} ms**. "
        f"Every gateway request was an AI message published with acks=all "
        f"({published:,.0f} publishes counted by the gateways' own metric).",
        "",
        "Load generator, servers and broker share the same 2 cores, so absolute numbers are lower "
        "than on a dedicated load host; the ratio is what the target is about.",
    ]
    body = "\n".join(lines)
    print(body)
    write_section(
        "gateway", "Gateway: callback throughput and latency", "python -m bench.gateway", body
    )


if __name__ == "__main__":
    main()
