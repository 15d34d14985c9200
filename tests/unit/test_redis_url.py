"""Redis URLs: one server, Sentinel and Cluster parsed; malformed ones named precisely."""

from __future__ import annotations

import asyncio

import pytest

from gateway.redis_url import RedisTarget, make_client, parse_redis_url


def test_single_server_urls_pass_through() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://u:p@redis:6380/2", "unix:///run/redis.sock"):
        assert parse_redis_url(url) == RedisTarget("single", url=url)


def test_sentinel_url() -> None:
    t = parse_redis_url("redis+sentinel://ferry:s%40cret@10.0.0.1:26379,10.0.0.2,[::1]:5000/cache/3")
    assert t.kind == "sentinel" and t.master == "cache" and t.db == 3
    assert t.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 5000))
    assert (t.username, t.password) == ("ferry", "s@cret")
    assert "s@cret" not in repr(t) and "s@cret" not in t.describe()
    assert parse_redis_url("redis+sentinel://h:1/mymaster/").db == 0


def test_cluster_url() -> None:
    t = parse_redis_url("redis+cluster://:pw@a:7000,b:7001")
    assert t.kind == "cluster" and t.nodes == (("a", 7000), ("b", 7001)) and t.password == "pw"
    assert parse_redis_url("redis+cluster://a").nodes == (("a", 6379),)
    assert parse_redis_url("redis+cluster://a:7000/0").kind == "cluster"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://127.0.0.1:26379", "no master name"),
        ("redis+sentinel://127.0.0.1:26379/", "no master name"),
        ("redis+sentinel://127.0.0.1:port/mymaster", "bad port 'port'"),
        ("redis+sentinel://127.0.0.1:70000/mymaster", "bad port '70000'"),
        ("redis+sentinel://127.0.0.1:0/mymaster", "bad port '0'"),
        ("redis+sentinel:///mymaster", "empty host list"),
        ("redis+sentinel://u:p@/mymaster", "empty host list"),
        ("redis+sentinel://a:1,,b:2/mymaster", "empty entry in the host list"),
        ("redis+sentinel://:1/mymaster", "bad host ':1'"),
        ("redis+sentinel://a:1/mymaster/x", "bad database 'x'"),
        ("redis+sentinel://a:1/m/0/extra", "too many path parts"),
        ("redis+sentinel://a:1/m?ssl=true", "take no query"),
        ("redis+cluster://", "empty host list"),
        ("redis+cluster://a:7000/3", "a cluster has database 0 only"),
        ("memcached://a:1", "unknown scheme 'memcached'"),
        ("127.0.0.1:6379", "not a URL"),
    ],
)
def test_malformed_urls_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("?", r"\?")):
        parse_redis_url(url)


def test_errors_never_repeat_the_password() -> None:
    with pytest.raises(ValueError) as err:
        parse_redis_url("redis+sentinel://user:topsecret@a:bad/m")
    assert "topsecret" not in str(err.value)


def test_clients_are_redis_py_own_for_each_kind() -> None:
    """Construction connects to nothing, so it is checked here without a server."""
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.sentinel import SentinelConnectionPool

    async def build() -> None:
        s = make_client("redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster/2", timeout_s=0.1)
        assert isinstance(s.client.connection_pool, SentinelConnectionPool)
        assert s.client.connection_pool.service_name == "mymaster"
        assert s.client.connection_pool.connection_kwargs["db"] == 2
        assert len(s._extra) == 2
        await s.aclose()
        c = make_client("redis+cluster://127.0.0.1:1", timeout_s=0.1)
        assert isinstance(c.client, RedisCluster) and c.cluster
        await c.aclose()
        one = make_client("redis://127.0.0.1:1/0", timeout_s=0.1, max_connections=7)
        assert one.client.connection_pool.max_connections == 7 and not one.cluster
        await one.aclose()

    asyncio.run(build())
