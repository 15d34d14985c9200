"""Which async HTTP server carries Ferry's REST front door: aiohttp and Starlette on uvicorn, side by side.

``python -m benchmarks.http_servers`` starts both in child processes on loopback ports, each
serving the same v2-shaped handler (parse a JSON infer body of ``--rows`` x 64 FP32 values,
answer a JSON body of the same size, no model), and drives them alternately with one aiohttp
client: a c=1 latency loop and a c=``--concurrency`` throughput loop, each bounded by
``--requests`` and ``--seconds``. It prints one JSON line per point and the aiohttp/uvicorn
ratios: only the ratios mean anything on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from benchmarks.stats import latency_summary
from ferry.core.netutil import free_port

WIDTH = 64


def _answer(body: bytes) -> bytes:
    request = json.loads(body)
    data = request["inputs"][0]["data"]
    shape = request["inputs"][0]["shape"]
    out = {"model_name": "echo", "outputs": [{"name": "y", "datatype": "FP32", "shape": shape, "data": data}]}
    return json.dumps(out).encode()


def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        return web.Response(body=_answer(await request.read()), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_uvicorn(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        return Response(_answer(await request.body()), media_type="application/json")

    app = Starlette(routes=[Route("/v2/models/{model}/infer", infer, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


SERVERS = {"aiohttp": serve_aiohttp, "uvicorn": serve_uvicorn}


async def _wait_up(port: int, deadline: float) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def drive(url: str, body: bytes, concurrency: int, requests: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[int] = []
    stop = time.monotonic() + seconds
    sent = 0

    async with aiohttp.ClientSession() as session:

        async def loop() -> None:
            nonlocal sent
            while sent < requests and time.monotonic() < stop:
                sent += 1
                t0 = time.perf_counter_ns()
                async with session.post(url, data=body) as resp:
                    payload = await resp.read()
                    assert resp.status == 200 and payload.startswith(b"{"), resp.status
                latencies.append(time.perf_counter_ns() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"requests": len(latencies), "rps": round(len(latencies) / wall, 1), **latency_summary(latencies)}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    ports = {name: free_port() for name in SERVERS}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"from benchmarks.http_servers import SERVERS; SERVERS[{name!r}]({port})"]
        )
        for name, port in ports.items()
    }
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [args.rows, WIDTH],
                     "data": [0.5] * (args.rows * WIDTH)}]}
    ).encode()  # fmt: skip
    points: list[dict[str, Any]] = []
    try:
        for port in ports.values():
            await _wait_up(port, time.monotonic() + 30)
        for _ in range(args.rounds):
            for concurrency in (1, args.concurrency):
                for name, port in ports.items():  # alternate, so drift hits both alike
                    url = f"http://127.0.0.1:{port}/v2/models/echo/infer"
                    result = await drive(url, body, concurrency, args.requests, args.seconds)
                    point = {"server": name, "concurrency": concurrency, **result}
                    print(json.dumps(point), flush=True)
                    points.append(point)
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(10)
    return points


def ratios(points: list[dict[str, Any]]) -> dict[str, float]:
    """aiohttp over uvicorn: throughput (higher is better for aiohttp) and p50 latency (lower)."""
    out: dict[str, float] = {}
    for concurrency in sorted({p["concurrency"] for p in points}):
        by = {
            name: [p for p in points if p["server"] == name and p["concurrency"] == concurrency]
            for name in SERVERS
        }
        rps = {n: sum(p["rps"] for p in ps) / len(ps) for n, ps in by.items()}
        p50 = {n: sum(p["p50_ms"] for p in ps) / len(ps) for n, ps in by.items()}
        out[f"c{concurrency}_rps_aiohttp_over_uvicorn"] = round(rps["aiohttp"] / rps["uvicorn"], 2)
        out[f"c{concurrency}_p50_aiohttp_over_uvicorn"] = round(p50["aiohttp"] / p50["uvicorn"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    points = asyncio.run(run(args))
    print(json.dumps({"ratios": ratios(points)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
