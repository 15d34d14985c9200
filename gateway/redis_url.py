"""One Redis URL, three deployments: a single server, Sentinel, or Redis Cluster.

    redis://[user:password@]host:port/db      one server (rediss:// for TLS, unix:// too)
    redis+sentinel://[user:password@]host:port,host:port/mastername[/db]
    redis+cluster://[user:password@]host:port,host:port

The result cache and the shared rate limiter both build their client here, so the two
always reach the same Redis the same way. Parsing is pure and raises ``ValueError`` with a
message naming the problem (never the password), so a bad URL stops the gateway at start-up
rather than at the first request. The clients are redis-py's own: ``Sentinel.master_for``
follows a failover by asking the sentinels for the master on every new connection, and
``RedisCluster`` follows slot moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
DEFAULT_PORT = {SENTINEL_SCHEME: 26379, CLUSTER_SCHEME: 6379}
MAX_NODES = 32

Kind = Literal["single", "sentinel", "cluster"]


@dataclass(frozen=True)
class RedisTarget:
    """Where the Redis is and how to log in; ``url`` is kept only for the single-server kind."""

    kind: Kind
    url: str = field(default="", repr=False)
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """For logs: the kind and the nodes, never the credentials."""
        if self.kind == "single":
            return "redis"
        nodes = ",".join(f"{h}:{p}" for h, p in self.nodes)
        return f"redis sentinel {nodes} master {self.master}" if self.master else f"redis cluster {nodes}"


def _port(text: str, scheme: str) -> int:
    if text == "":
        return DEFAULT_PORT[scheme]
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r}: expected a number from 1 to 65535")
    return int(text)


def _node(text: str, scheme: str) -> tuple[str, int]:
    if text.startswith("["):  # [ipv6]:port
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host {text!r}: an IPv6 address goes in brackets, [::1]:port")
        return host, _port(rest[1:], scheme)
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"bad host {text!r}: expected host:port")
    return host, _port(port, scheme)


def _nodes(netloc: str, scheme: str) -> tuple[tuple[str, int], ...]:
    parts = [p.strip() for p in netloc.split(",")]
    if not netloc.strip() or all(not p for p in parts):
        raise ValueError("empty host list: expected host:port[,host:port...]")
    if any(not p for p in parts):
        raise ValueError("empty entry in the host list: expected host:port[,host:port...]")
    if len(parts) > MAX_NODES:
        raise ValueError(f"too many hosts: {len(parts)} (at most {MAX_NODES})")
    return tuple(_node(p, scheme) for p in parts)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad database {text!r}: expected a number")
    return int(text)


def parse_redis_url(url: str) -> RedisTarget:
    """The target a URL names; ``ValueError`` says what is wrong with it."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError("not a URL: expected redis://, rediss://, redis+sentinel:// or redis+cluster://")
    if scheme in SINGLE_SCHEMES:
        return RedisTarget("single", url=url)
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise ValueError(
            f"unknown scheme {scheme!r}: expected redis://, rediss://, unix://, redis+sentinel:// "
            "or redis+cluster://"
        )
    if "?" in rest or "#" in rest:
        raise ValueError(f"{scheme}:// URLs take no query or fragment")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    nodes = _nodes(netloc, scheme)
    segments = [s for s in path.split("/")] if path else []
    if scheme == CLUSTER_SCHEME:
        if any(segments) and segments not in (["0"], ["0", ""]):
            raise ValueError("redis+cluster:// takes no path: a cluster has database 0 only")
        return RedisTarget("cluster", nodes=nodes, username=username, password=password)
    if segments and segments[-1] == "":
        segments = segments[:-1]
    if not segments or not segments[0]:
        raise ValueError("no master name: expected redis+sentinel://host:port,host:port/mastername[/db]")
    if len(segments) > 2:
        raise ValueError("too many path parts: expected /mastername[/db]")
    db = _db(segments[1]) if len(segments) == 2 else 0
    return RedisTarget(
        "sentinel", nodes=nodes, master=unquote(segments[0]), db=db, username=username, password=password
    )


class RedisClient:
    """A redis-py asyncio client for any kind of target, plus what closing it takes."""

    def __init__(self, target: RedisTarget, client: Any, extra: Sequence[Any] = ()) -> None:
        self.target = target
        self.client = client
        self._extra = list(extra)  # the sentinels' own clients

    @property
    def cluster(self) -> bool:
        return self.target.kind == "cluster"

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """One MGET; a cluster splits it by slot (keys of one batch hash to many)."""
        if self.cluster:
            return list(await self.client.mget_nonatomic(list(keys)))
        return list(await self.client.mget(list(keys)))

    async def aclose(self) -> None:
        await self.client.aclose()
        for c in self._extra:
            await c.aclose()


def make_client(
    url: str, *, timeout_s: float, max_connections: int | None = None, retry: Any = None
) -> RedisClient:
    """The client the URL calls for, with every socket bounded by ``timeout_s``."""
    import redis.asyncio as redis

    target = parse_redis_url(url)
    sockets: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    pool: dict[str, Any] = {"health_check_interval": 0}
    if max_connections is not None:
        pool["max_connections"] = max_connections
    if retry is not None:
        pool["retry"] = retry
    if target.kind == "single":
        return RedisClient(target, redis.from_url(url, **sockets, **pool))
    login: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        cluster_kw = {k: v for k, v in pool.items() if k != "health_check_interval"}
        client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], **login, **sockets, **cluster_kw
        )
        return RedisClient(target, client)
    from redis.asyncio.sentinel import Sentinel

    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=dict(sockets), **sockets)
    client = sentinel.master_for(target.master, db=target.db, **login, **sockets, **pool)
    return RedisClient(target, client, sentinel.sentinels)
