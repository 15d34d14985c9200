"""Which workers exist, which are healthy, and which model versions each has READY.

Workers come from a static list and/or DNS names re-resolved every
``dns_interval_s`` (a Kubernetes headless Service resolves to one address per
pod). For each worker the gateway keeps a ``grpc.health.v1`` Watch stream open
(a dead or draining worker leaves the pool the moment its stream breaks or says
NOT_SERVING) and polls its RepositoryIndex (new versions roll in, old ones
unload, with no health change). The parsing helpers are pure and unit-tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.core.configproto import spec_from_config_proto
from ferry.core.errors import InvalidArgument, NotFound, Unavailable
from ferry.core.modelconfig import ModelSpec

log = logging.getLogger("ferry.gateway.discovery")

READY = "READY"
HEALTH_TIMEOUT_S = 2.0
SLOW_CHECKS_TOLERATED = 2


def parse_target(target: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port); raises ``InvalidArgument``."""
    host, sep, port = target.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"worker address {target!r} is not HOST:PORT")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def index_from_response(resp: pb.RepositoryIndexResponse) -> dict[str, dict[str, str]]:
    """RepositoryIndex -> {model: {version: state}}; entries without a version are skipped."""
    out: dict[str, dict[str, str]] = {}
    for entry in resp.models:
        if entry.version:
            out.setdefault(entry.name, {})[entry.version] = entry.state.upper()
        else:
            out.setdefault(entry.name, {})
    return out


def latest_ready(versions: dict[str, str]) -> str | None:
    ready = [v for v, state in versions.items() if state == READY and v.isdigit()]
    return max(ready, key=int) if ready else None


@dataclass
class Worker:
    """One worker's channel and what the gateway last learnt about it."""

    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.GRPCInferenceServiceStub
    serving: bool = False
    models: dict[str, dict[str, str]] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    index_ok: bool = False

    def ready(self, model: str, version: str) -> bool:
        return self.serving and self.models.get(model, {}).get(version) == READY


ChannelFactory = Callable[[str], grpc.aio.Channel]


class Discovery:
    """Keeps the worker pool current; the data plane asks it who can serve what."""

    def __init__(
        self,
        static: list[str],
        dns: list[str],
        channel_factory: ChannelFactory,
        *,
        dns_interval_s: float = 5.0,
        index_interval_s: float = 0.5,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        for target in [*static, *dns]:
            parse_target(target)
        if not static and not dns:
            raise InvalidArgument("the gateway needs --workers or --workers-dns")
        self.static = static
        self.dns = dns
        self.channel_factory = channel_factory
        self.dns_interval_s = dns_interval_s
        self.index_interval_s = index_interval_s
        self.on_change = on_change
        self.workers: dict[str, Worker] = {}
        self._specs: dict[tuple[str, str], ModelSpec] = {}
        # (model, asked version) -> (version it runs on, workers that have it ready): every
        # request asks, the answer changes only when a worker's health or index does (_notify)
        self._routes: dict[tuple[str, str], tuple[str, list[str]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        for address in self.static:
            self._add(address)
        if self.dns:
            await self._resolve_dns()
            self._tasks.append(asyncio.ensure_future(self._dns_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for address in list(self.workers):
            await self._remove(address)

    def _add(self, address: str) -> None:
        if address in self.workers:
            return
        channel = self.channel_factory(address)
        worker = Worker(address, channel, pb_grpc.GRPCInferenceServiceStub(channel))
        self.workers[address] = worker
        worker.tasks = [
            asyncio.ensure_future(self._watch_health(worker)),
            asyncio.ensure_future(self._poll_index(worker)),
        ]
        log.info("worker added", extra={"worker": address})

    async def _remove(self, address: str) -> None:
        worker = self.workers.pop(address, None)
        if worker is None:
            return
        for task in worker.tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await worker.channel.close()
        self._notify()
        log.info("worker removed", extra={"worker": address})

    def _notify(self) -> None:
        self._routes.clear()
        self._changed.set()
        self._changed = asyncio.Event()
        if self.on_change is not None:
            self.on_change()

    # -- DNS -------------------------------------------------------------------------------------
    async def _resolve_dns(self) -> None:
        loop = asyncio.get_running_loop()
        wanted: set[str] = set(self.static)
        for target in self.dns:
            host, port = parse_target(target)
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as err:
                log.warning("cannot resolve %s: %s", target, err)
                # keep what this name gave before: a DNS hiccup must not empty the pool
                wanted |= {a for a in self.workers if a not in self.static}
                continue
            wanted |= {format_address(str(info[4][0]), port) for info in infos}
        for address in wanted - set(self.workers):
            self._add(address)
        for address in set(self.workers) - wanted:
            await self._remove(address)

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self.dns_interval_s)
            try:
                await self._resolve_dns()
            except Exception:
                log.warning("DNS refresh failed", exc_info=True)

    # -- per worker --------------------------------------------------------------------------
    async def _watch_health(self, worker: Worker) -> None:
        """Follow the worker's health: a Watch stream, or Check polls where Watch does not work."""
        stub = health_pb2_grpc.HealthStub(worker.channel)
        request = health_pb2.HealthCheckRequest(service="")
        backoff = 0.1
        watch = True
        slow = 0
        while True:
            try:
                if watch:
                    async for msg in stub.Watch(request):
                        await self._health_answer(worker, msg.status)
                        backoff = 0.1
                else:
                    msg = await stub.Check(request, timeout=HEALTH_TIMEOUT_S)
                    slow = 0
                    await self._health_answer(worker, msg.status)
                    await asyncio.sleep(self.index_interval_s)
                    continue
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                if watch and err.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL):
                    log.info(
                        "health Watch unusable on %s (%s): polling Check", worker.address, err.code().name
                    )
                    watch = False
                    continue
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and slow < SLOW_CHECKS_TOLERATED:
                    slow += 1  # a busy worker answers late: that is load, not death
                    continue
                log.info("health of %s: %s", worker.address, err.code().name)
            except Exception as err:
                log.info("health watch of %s ended: %s", worker.address, type(err).__name__)
            self._set_serving(worker, False)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _health_answer(self, worker: Worker, status: int) -> None:
        serving = status == health_pb2.HealthCheckResponse.SERVING
        if serving and not worker.serving:
            await self.refresh(worker)
        self._set_serving(worker, serving)

    def _set_serving(self, worker: Worker, serving: bool) -> None:
        if worker.serving != serving:
            worker.serving = serving
            log.warning("worker %s %s", worker.address, "serving" if serving else "not serving")
            self._notify()

    async def _poll_index(self, worker: Worker) -> None:
        while True:
            await asyncio.sleep(self.index_interval_s)
            if worker.serving:
                await self.refresh(worker)

    async def refresh(self, worker: Worker) -> None:
        """Re-read one worker's repository index (also called after a version went missing)."""
        try:
            resp = await worker.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as err:
            worker.index_ok = False
            log.info("index of %s failed: %s", worker.address, err.code().name)
            return
        models = index_from_response(resp)
        worker.index_ok = True
        if models != worker.models:
            # only versions whose state changed: a version that stays READY while its successor
            # loads keeps its signature, so requests routed to it are still checked without a fetch
            for model in set(models) | set(worker.models):
                old, new = worker.models.get(model, {}), models.get(model, {})
                for version in set(old) | set(new):
                    if old.get(version) != new.get(version):
                        self.forget_specs(model, version)
            worker.models = models
            self._notify()

    def suspect(self, address: str) -> None:
        """A call to ``address`` failed at the transport: refresh it soon."""
        worker = self.workers.get(address)
        if worker is not None:
            task = asyncio.ensure_future(self.refresh(worker))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- queries ---------------------------------------------------------------------------------
    def healthy(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.serving]

    def versions(self, model: str) -> dict[str, str]:
        """Best state of each version of ``model`` across healthy workers."""
        out: dict[str, str] = {}
        for w in self.healthy():
            for version, state in w.models.get(model, {}).items():
                if out.get(version) != READY:
                    out[version] = state
        return out

    def has_model(self, model: str) -> bool:
        return any(model in w.models for w in self.healthy())

    def route(self, model: str, version: str = "") -> tuple[str, list[str]]:
        """``resolve`` and ``candidates`` in one, remembered until the pool changes."""
        key = (model, version)
        hit = self._routes.get(key)
        if hit is None:
            resolved = self.resolve(model, version)
            hit = self._routes[key] = (resolved, self.candidates(model, resolved))
        return hit

    def resolve(self, model: str, version: str = "") -> str:
        """The version a request for ``model`` (and optional ``version``) runs on."""
        if not self.healthy():
            raise Unavailable(self.no_worker_message())
        versions = self.versions(model)
        if version:
            if versions.get(version) == READY:
                return version
            raise NotFound(f"model {model!r} version {version} is not ready on any worker")
        latest = latest_ready(versions)
        if latest is None:
            raise NotFound(f"model {model!r} is not ready on any worker")
        return latest

    def authority(self, model: str) -> Worker:
        """A healthy worker to word an error about ``model`` (one that lists it, if any)."""
        healthy = self.healthy()
        if not healthy:
            raise Unavailable(self.no_worker_message())
        return next((w for w in healthy if model in w.models), healthy[0])

    def candidates(self, model: str, version: str) -> list[str]:
        return [w.address for w in self.healthy() if w.ready(model, version)]

    def holders(self, model: str) -> list[str]:
        """Every known worker that serves ``model``, healthy or not: those whose last index listed
        it, and those whose index was never read (down since before this gateway started). The
        set a continuation of a sequence this gateway has no record of is hashed over, so gateway
        replicas agree on it while the workers stay the same."""
        return [
            w.address for w in self.workers.values() if model in w.models or (not w.models and not w.index_ok)
        ]

    def no_worker_message(self) -> str:
        return (
            f"no healthy worker: 0 of {len(self.workers)} known workers are serving "
            f"({', '.join(sorted(self.workers)) or 'none discovered'})"
        )

    async def spec(self, model: str, version: str) -> ModelSpec:
        """The model's signature, fetched once per version from a worker that has it."""
        key = (model, version)
        cached = self._specs.get(key)
        if cached is not None:
            return cached
        last: Exception | None = None
        for address in self.candidates(model, version) or [w.address for w in self.healthy()]:
            worker = self.workers.get(address)
            if worker is None:
                continue
            try:
                resp = await worker.stub.ModelConfig(
                    pb.ModelConfigRequest(name=model, version=version), timeout=5.0
                )
            except grpc.aio.AioRpcError as err:
                last = err
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    await self.refresh(worker)  # its index is behind (a rollout): catch up now
                continue
            spec = spec_from_config_proto(resp.config)
            self._specs[key] = spec
            return spec
        raise Unavailable(f"cannot read the configuration of model {model!r} from any worker: {last}")

    def forget_specs(self, model: str | None = None, version: str | None = None) -> None:
        for key in [
            k
            for k in self._specs
            if (model is None or k[0] == model) and (version is None or k[1] == version)
        ]:
            del self._specs[key]

    async def wait_changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
