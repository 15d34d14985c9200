"""One ``ferry bench`` run: build the models, start the servers, measure every point.

Points are measured side by side: for each model and concurrency, every scenario
runs back to back, so the ratios to the floor compare numbers taken within
seconds of each other on a machine whose speed drifts during the day.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.loadgen import Window, closed_loop, in_process
from benchmarks.models import BenchModel, prepare, session
from benchmarks.procs import RedisServer, ServerProcess
from benchmarks.rest_client import RestStub
from benchmarks.stats import HTTP_SCENARIOS, SCENARIOS
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client._channel import open_channel
from ferry.client.inference import build_request
from ferry.core.netutil import free_port

GATEWAY_SCENARIOS = ("gateway-nocache", *HTTP_SCENARIOS, "gateway-hits", "gateway-hits-redis")
HIT_SCENARIOS = ("gateway-hits", "gateway-hits-redis")
REDIS_SCENARIO = "gateway-hits-redis"
NEAR_CACHE_BYTES = 64 << 20  # the Redis gateway's near cache: what makes its hits in-process
SERVER_SCENARIOS = ("floor", "worker", *GATEWAY_SCENARIOS)


@dataclass
class BenchConfig:
    scenarios: Sequence[str] = SCENARIOS
    models: Sequence[str] = ("mlp", "cnn")
    concurrency: Sequence[int] = (1, 8, 32, 64)
    warmup_s: float = 1.0
    duration_s: float = 5.0
    max_requests: int = 0
    output_dir: Path = Path("bench-results")
    redis_url: str | None = None
    worker_procs: int = 1
    channels: int = 0  # 0: one per server process behind the address
    pool_size: int = 16
    soak_s: float = 0.0
    soak_interval_s: float = 10.0
    worker_flags: Sequence[str] = ()
    rounds: int = 1  # every (model, concurrency) group measured this many times, interleaved
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)


class Servers:
    """The server processes a run needs, started once and stopped at the end."""

    def __init__(self, cfg: BenchConfig, store: Path) -> None:
        self.cfg = cfg
        self.store = store
        self.floor: list[ServerProcess] = []
        self.naive: list[ServerProcess] = []
        self.workers: list[ServerProcess] = []
        self.gateways: list[ServerProcess] = []
        self.redis_gateways: list[ServerProcess] = []  # gateway-hits-redis: Redis plus its near cache
        self.redis: RedisServer | None = None
        self.http_port = 0  # the plain gateway's REST port, for the HTTP scenarios

    def _group(self, make: Callable[[str, bool], ServerProcess], count: int) -> list[ServerProcess]:
        """``count`` processes on one port: the first picks it, the others join with SO_REUSEPORT."""
        first = make("0", count > 1).start()
        group = [first]
        for _ in range(count - 1):
            group.append(make(str(first.port), True).start())
        return group

    def start(self) -> None:
        scenarios = set(self.cfg.scenarios)
        models = ",".join(self.cfg.models)
        procs = max(1, self.cfg.worker_procs)
        for name in ("floor", "naive"):  # the benchmark's own servers, one module each
            if name in scenarios:
                self.cfg.log(f"starting the {name} server")
                setattr(self, name, self._bench_server(name, models, procs))
        if scenarios & {"worker", *GATEWAY_SCENARIOS}:
            self.cfg.log(f"starting {procs} worker process(es)")
            self.workers = self._group(
                lambda port, reuse: ServerProcess.ferry(
                    "worker",
                    "worker",
                    "--store",
                    str(self.store),
                    "--port",
                    port,
                    "--poll-interval-s",
                    "0",
                    *(["--reuse-port"] if reuse else []),
                    *self.cfg.worker_flags,
                ),
                procs,
            )
        if scenarios & set(GATEWAY_SCENARIOS) - {REDIS_SCENARIO}:
            self.cfg.log("starting the gateway")
            redis = ["--redis-url", self.cfg.redis_url] if self.cfg.redis_url else []
            self.gateways = [self._gateway(*redis)]
        if REDIS_SCENARIO in scenarios:
            url = self.cfg.redis_url or self._private_redis()
            self.cfg.log(f"starting the gateway with Redis and a {NEAR_CACHE_BYTES >> 20} MiB near cache")
            self.redis_gateways = [
                self._gateway("--redis-url", url, "--cache-near-bytes", str(NEAR_CACHE_BYTES))
            ]

    def _bench_server(self, name: str, models: str, procs: int) -> list[ServerProcess]:
        """``benchmarks.<name>`` (the floor, the naive server) over the bench store, ``procs`` of them."""
        return self._group(
            lambda port, reuse: ServerProcess.module(
                name,
                f"benchmarks.{name}",
                "--store",
                str(self.store),
                "--models",
                models,
                "--pool-size",
                str(self.cfg.pool_size),
                "--port",
                port,
                *(["--reuse-port"] if reuse else []),
            ),
            procs,
        )

    def _gateway(self, *extra: str) -> ServerProcess:
        http = free_port() if not self.http_port and set(self.cfg.scenarios) & set(HTTP_SCENARIOS) else 0
        gateway = ServerProcess.ferry(
            "gateway",
            "gateway",
            "--workers",
            self.workers[0].address,
            "--port",
            "0",
            "--http-port",
            str(http),
            "--host",
            "127.0.0.1",
            *extra,
        ).start()
        self.http_port = self.http_port or http
        return gateway

    def _private_redis(self, timeout: float = 10.0) -> str:
        """A redis-server of the run's own on a free loopback port, no persistence."""
        self.redis = RedisServer().start(timeout)
        return self.redis.url

    def stop(self) -> None:
        for p in [*self.gateways, *self.redis_gateways, *self.workers, *self.floor, *self.naive]:
            p.stop()
        if self.redis is not None:
            self.redis.stop()

    def pids(self, scenario: str) -> dict[str, int]:
        def named(group: list[ServerProcess], name: str) -> dict[str, int]:
            return {(f"{name}{i}" if len(group) > 1 else name): p.pid for i, p in enumerate(group)}

        if scenario == "floor":
            return named(self.floor, "floor")
        if scenario == "naive":
            return named(self.naive, "naive")
        if scenario == "worker":
            return named(self.workers, "worker")
        gateways = self.redis_gateways if scenario == REDIS_SCENARIO else self.gateways
        return {**named(gateways, "gateway"), **named(self.workers, "worker")}

    def address(self, scenario: str) -> str:
        groups = {
            "floor": self.floor,
            "naive": self.naive,
            "worker": self.workers,
            REDIS_SCENARIO: self.redis_gateways,
        }
        return groups.get(scenario, self.gateways)[0].address

    def rss(self) -> dict[str, int]:
        out = {}
        for name, group in (("worker", self.workers), ("gateway", self.gateways), ("floor", self.floor)):
            for i, p in enumerate(group):
                out[f"{name}{i if len(group) > 1 else ''}"] = psutil.Process(p.pid).memory_info().rss
        return out


def requests_for(model: BenchModel, scenario: str) -> list[pb.ModelInferRequest]:
    """Pre-built batch-1 requests, one per pool input; ``id`` is the input's index."""
    params = {"ferry_cache": False} if scenario in ("gateway-nocache", *HTTP_SCENARIOS) else None
    return [
        build_request(model.name, {"input": model.pool[i : i + 1]}, parameters=params, request_id=str(i))
        for i in range(len(model.pool))
    ]


class Bench:
    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.store = Path(cfg.output_dir) / "store"
        self.models: dict[str, BenchModel] = {}
        self.servers = Servers(cfg, self.store)
        self.channels: dict[str, list[Any]] = {}
        self.points: list[dict[str, Any]] = []
        self.soak: dict[str, Any] | None = None

    def prepare(self) -> None:
        for name in self.cfg.models:
            self.cfg.log(f"building model {name} (export + reference outputs)")
            self.models[name] = prepare(name, self.store, self.cfg.pool_size)

    def _stubs(self, scenario: str) -> list[Any]:
        if scenario in HTTP_SCENARIOS:
            key = f"http:{scenario}"
            if key not in self.channels:
                count = self.cfg.channels or 1
                address = f"127.0.0.1:{self.servers.http_port}"
                self.channels[key] = [RestStub(address, scenario.endswith("binary")) for _ in range(count)]
            return self.channels[key]
        address = self.servers.address(scenario)
        if address not in self.channels:
            count = self.cfg.channels or max(1, self.cfg.worker_procs)
            # A local subchannel pool gives each channel its own TCP connection, so SO_REUSEPORT
            # can spread them over processes.
            self.channels[address] = [
                open_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)
            ]
        return [pb_grpc.GRPCInferenceServiceStub(c) for c in self.channels[address]]

    async def _worker_stats(self, model: str) -> tuple[int, int]:
        inferences = executions = 0
        for w in self.servers.workers:
            stub = self._stubs_for_address(w.address)
            resp = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
            for s in resp.model_stats:
                inferences += s.inference_count
                executions += s.execution_count
        return inferences, executions

    def _stubs_for_address(self, address: str) -> Any:
        key = f"stats:{address}"
        if key not in self.channels:
            self.channels[key] = [open_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])]
        return pb_grpc.GRPCInferenceServiceStub(self.channels[key][0])

    async def point(
        self, model: BenchModel, scenario: str, concurrency: int, duration_s: float | None = None, **kw: Any
    ) -> dict[str, Any]:
        cfg = self.cfg
        duration = cfg.duration_s if duration_s is None else duration_s
        if scenario == "ort":
            window = in_process(
                session(model.onnx_file),
                model.pool,
                model.expected,
                concurrency=concurrency,
                warmup_s=cfg.warmup_s,
                duration_s=duration,
                max_requests=cfg.max_requests,
            )
        else:
            requests = requests_for(model, scenario)
            stubs = self._stubs(scenario)
            if scenario in HIT_SCENARIOS:
                # Fill the cache first, so every recorded answer is a hit however short the warm-up.
                for request in requests:
                    await stubs[0].ModelInfer(request, timeout=30)
            stats = None
            if scenario not in ("floor", "naive") and self.servers.workers:
                stats = lambda: self._worker_stats(model.name)  # noqa: E731
            window = await closed_loop(
                stubs,
                requests,
                model.expected,
                concurrency=concurrency,
                warmup_s=cfg.warmup_s,
                duration_s=duration,
                max_requests=cfg.max_requests,
                server_pids=self.servers.pids(scenario),
                stats=stats,
                **kw,
            )
        result = {"model": model.name, "scenario": scenario, "concurrency": concurrency, **window.as_dict()}
        if scenario in HIT_SCENARIOS and result["hits"] != result["requests"]:
            result["wrong"] += result["requests"] - result["hits"]
            result["first_wrong"] = result["first_wrong"] or f"{result['requests'] - result['hits']} misses"
        return result

    async def run(self) -> list[dict[str, Any]]:
        """Every point; with ``rounds`` > 1 each (model, concurrency) group is measured that many
        times over, scenario after scenario, so every round has its own floor seconds away."""
        cfg = self.cfg
        rounds = max(1, cfg.rounds)
        scenarios = [s for s in SCENARIOS if s in cfg.scenarios]
        total = len(cfg.models) * len(cfg.concurrency) * len(scenarios) * rounds
        n = 0
        for name in cfg.models:
            for c in cfg.concurrency:
                for r in range(1, rounds + 1):
                    for scenario in scenarios:
                        n += 1
                        p = await self.point(self.models[name], scenario, c)
                        if rounds > 1:
                            p["round"] = r
                        self.points.append(p)
                        cfg.log(progress_line(n, total, p))
        return self.points

    async def run_soak(self, model: str = "cnn", concurrency: int = 32) -> dict[str, Any]:
        """Worker and gateway RSS sampled over ``soak_s`` of load at c=32 (gateway, cache off)."""
        cfg = self.cfg
        scenario = "gateway-nocache" if self.servers.gateways else "worker"
        samples: list[dict[str, Any]] = []

        def tick(window: Window, elapsed: float) -> None:
            sample = {"t_s": round(elapsed, 1), "requests": window.requests, "rss": self.servers.rss()}
            samples.append(sample)
            rss = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sample["rss"].items())
            cfg.log(f"soak {elapsed:6.0f}s  {window.requests} requests  {rss}")

        p = await self.point(
            self.models[model],
            scenario,
            concurrency,
            duration_s=cfg.soak_s,
            on_tick=tick,
            tick_s=cfg.soak_interval_s,
        )
        self.soak = {"point": p, "samples": samples, "growth": rss_growth(samples)}
        return self.soak

    async def close(self) -> None:
        for chans in self.channels.values():
            for ch in chans:
                await ch.close()


def rss_growth(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per process, RSS at the end over RSS at the first sample, minus 1 (0.05 = grew 5%)."""
    if len(samples) < 2:
        return {}
    first, last = samples[0]["rss"], samples[-1]["rss"]
    return {k: last[k] / first[k] - 1 for k in first if k in last and first[k]}


def progress_line(n: int, total: int, p: dict[str, Any]) -> str:
    batch = "" if math.isnan(p["mean_batch"]) else f" batch {p['mean_batch']:.1f}"
    round_ = f" round {p['round']}" if "round" in p else ""
    return (
        f"[{n:>2}/{total}] {p['model']} c={p['concurrency']:<2} {p['scenario']:<15}{round_} "
        f"{p['throughput']:8.0f} req/s  p50 {p['p50_ms']:6.2f} ms  p99 {p['p99_ms']:6.2f} ms{batch}  "
        f"errors {p['errors']}  checked {p['checked']}/{p['requests']}"
        + (f" WRONG {p['wrong']}: {p['first_wrong']}" if p["wrong"] else "")
    )


async def bench(cfg: BenchConfig) -> Bench:
    """Everything a run does, with the servers stopped however it ends."""
    b = Bench(cfg)
    started = time.monotonic()
    b.prepare()
    try:
        b.servers.start()
        if cfg.soak_s > 0:
            await b.run_soak()
        else:
            await b.run()
    finally:
        await b.close()
        b.servers.stop()
    cfg.extra["elapsed_s"] = round(time.monotonic() - started, 1)
    return b
