"""``ferry up``, ``ferry demo`` and ``ferry status``: the whole stack on one machine.

``up`` starts every service (see ``ferry.stack``), builds the demo model on the
first run and keeps serving until Ctrl-C or SIGTERM. ``demo`` does the same, then
classifies the digits test split through the gateway, prints accuracy and
latency, and stops. ``status`` asks each service of a running stack for its health (the
gateway's REST port over HTTP, ``/v2/health/ready``; Redis with PING; the rest over gRPC health).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

from ferry.core.settings import add_settings_flags, settings_from_args
from ferry.pki import Secrets
from ferry.stack import Stack, UpSettings


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="run the whole stack on one machine until Ctrl-C")
    add_settings_flags(up, UpSettings)
    up.add_argument("--no-demo", action="store_true", help="do not build the demo model")
    up.add_argument("--demo-epochs", type=int, default=20, help="epochs for the demo model (first run only)")
    up.set_defaults(handler=lambda a: _run(a, classify=False, keep_running=True))

    demo = sub.add_parser("demo", help="start the stack, train -> export -> serve -> classify digits, stop")
    add_settings_flags(demo, UpSettings)
    demo.add_argument(
        "--demo-epochs",
        type=int,
        default=None,
        help="epochs for the demo model (first run only; default 20, or 8 with --text)",
    )
    demo.add_argument(
        "--text",
        action="store_true",
        help="the text demo: a transformer and its tokenizer on the topics corpus, classified from strings",
    )
    demo.add_argument("--keep-running", action="store_true", help="keep the stack up after the demo")
    demo.set_defaults(handler=lambda a: _run(a, classify=True, keep_running=a.keep_running), no_demo=False)

    status = sub.add_parser("status", help="health and address of each service of a running `ferry up`")
    status.add_argument("--state-file", default=".ferry/stack.json", help="written by `ferry up`")
    status.set_defaults(handler=_status)


def _say(text: str) -> None:
    print(text, flush=True)


def _run(args: argparse.Namespace, *, classify: bool, keep_running: bool) -> int:
    settings = settings_from_args(UpSettings, args)
    text = bool(getattr(args, "text", False))
    return asyncio.run(
        _stack_main(settings, not args.no_demo, args.demo_epochs, classify, keep_running, text)
    )


async def _stack_main(
    settings: UpSettings,
    build_demo: bool,
    epochs: int | None,
    classify: bool,
    keep_running: bool,
    text: bool = False,
) -> int:
    from ferry.core.store import Store
    from ferry.demo import DIGITS, TOPICS, classify_digits, classify_texts, ensure_demo_model

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = Stack(settings)
    _say(f"ferry up: starting trainer, exporter, {settings.workers} worker(s) and the gateway")
    _say(f"  logs in {settings.log_dir}")
    work = asyncio.create_task(stack.start())
    interrupted = asyncio.create_task(stop.wait())
    await asyncio.wait({work, interrupted}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():
        work.cancel()
        await stack.stop()
        return 130
    work.result()
    try:
        _say(stack.redis_note)
        if stack.secrets is not None:
            _say_secrets(stack.secrets)
        for name, address in stack.addresses().items():
            _say(f"  {name:<12} {address}")
        if build_demo:
            store = Store(settings.store)
            addresses = stack.addresses()
            demo = TOPICS if text else DIGITS
            version = await ensure_demo_model(
                store,
                addresses["trainer"],
                addresses["exporter"],
                epochs,
                _say,
                stack.client_options(),
                demo,
            )
            if classify:
                classify_held_out = classify_texts if text else classify_digits
                result = await classify_held_out(
                    addresses["gateway"], version, options=stack.client_options("infer")
                )
                what = "texts (sent as strings)" if text else "digits"
                _say(
                    f"classified {result.samples} held-out {what} through the gateway: "
                    f"accuracy {result.accuracy:.4f}, latency p50 {result.p50_ms:.2f} ms, "
                    f"p99 {result.p99_ms:.2f} ms, {result.samples / result.seconds:.0f} requests/s "
                    f"(model '{demo.model}' v{result.model_version})"
                )
        if keep_running:
            addresses = stack.addresses()
            _say(
                f"ferry up: serving; the gateway is at {addresses['gateway']} (gRPC) and "
                f"{addresses['gateway-http']} (HTTP). Ctrl-C stops everything."
            )
            await stop.wait()
    finally:
        _say("ferry up: stopping every service")
        await stack.stop()
    return 0


def _say_secrets(secrets: Secrets) -> None:
    """The keys are shown once, when they are made; after that only where they are kept."""
    _say(f"  TLS and API keys on every service; CA and keys in {secrets.folder}")
    if secrets.created:
        _say(f"  admin key     {secrets.admin_key}")
        _say(f"  inference key {secrets.infer_key}")
        _say("  (shown once; ferry commands find them; other clients send 'authorization: Bearer KEY')")


def _status(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    path = Path(args.state_file)
    if not path.is_file():
        print(f"no running stack: {path} does not exist (start one with `ferry up`)", file=sys.stderr)
        return 1
    state = json.loads(path.read_text())
    ca = (state.get("secure") or {}).get("ca")
    creds = grpc.ssl_channel_credentials(Path(ca).read_bytes()) if ca else None
    healthy = True
    print(f"{'service':<12} {'address':<28} health")
    for name, address in state["services"].items():
        if address.startswith(("http://", "https://")):
            health = _http_health(address, ca)
        elif name == "redis":
            host, _, port = address.removeprefix("redis://").partition("/")[0].rpartition(":")
            try:
                with socket.create_connection((host, int(port)), 1) as s:
                    s.sendall(b"PING\r\n")
                    health = "SERVING" if s.recv(16).startswith(b"+PONG") else "NOT_SERVING"
            except OSError:
                health = "DOWN"
        else:
            try:
                channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
                with channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                health = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError:
                health = "DOWN"
        healthy &= health == "SERVING"
        print(f"{name:<12} {address:<28} {health}")
    return 0 if healthy else 1


def _http_health(url: str, ca: str | None) -> str:
    """A KServe v2 REST port's readiness: 200 from ``/v2/health/ready`` is SERVING (no key needed)."""
    import ssl
    import urllib.error
    import urllib.request

    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]  # a local port
    if url.startswith("https://"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)))
    try:
        with urllib.request.build_opener(*handlers).open(f"{url}/v2/health/ready", timeout=2) as reply:
            return "SERVING" if reply.status == 200 else "NOT_SERVING"
    except urllib.error.HTTPError:
        return "NOT_SERVING"
    except (OSError, ValueError):
        return "DOWN"
