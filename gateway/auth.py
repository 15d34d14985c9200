"""Optional API keys: who may call which models, how often.

A client sends ``authorization: Bearer <key>``. Keys are never stored: the key
file (YAML or JSON, or the same document in ``FERRY_GATEWAY_API_KEYS``) holds
their sha256 hex digests, each with the model name globs it may use and a
token-bucket rate limit::

    keys:
      - name: team-a
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        models: ["mlp*", "ranker"]      # fnmatch globs; ["*"] = every model
        rate_per_s: 100                  # sustained requests per second (0 = unlimited)
        burst: 200                       # bucket size

Health, liveness, readiness, server metadata and reflection stay open so
probes and load balancers need no key. Failures: no or unknown key ->
UNAUTHENTICATED, model outside the key's globs -> PERMISSION_DENIED, bucket
empty -> RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from ferry.core.errors import InvalidArgument

OPEN_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ServerMetadata",
    }
)
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def hash_key(key: str) -> str:
    """What the key file stores for ``key``: its sha256 hex digest.

    There is no CLI command for it: call this function (``python -c "from gateway.auth import
    hash_key; print(hash_key('KEY'))"``) or run ``printf %s KEY | sha256sum`` (no trailing newline).
    """
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; the clock is injectable for tests."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, n: float = 1.0) -> bool:
        now = self.clock()
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


@dataclass
class ApiKey:
    name: str
    digest: str
    models: tuple[str, ...] = ("*",)
    bucket: TokenBucket | None = None

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


@dataclass
class KeyRing:
    keys: dict[str, ApiKey] = field(default_factory=dict)

    @classmethod
    def parse(cls, doc: Any, where: str, clock: Callable[[], float] = time.monotonic) -> KeyRing:
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise InvalidArgument(f"{where}: expected a mapping with a 'keys' list")
        ring = cls()
        for n, entry in enumerate(doc["keys"]):
            if not isinstance(entry, dict):
                raise InvalidArgument(f"{where}: key #{n} is not a mapping")
            digest = str(entry.get("sha256", "")).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise InvalidArgument(f"{where}: key #{n} needs 'sha256', the hex sha256 of the key")
            models = entry.get("models", ["*"])
            if isinstance(models, str):
                models = [models]
            rate = float(entry.get("rate_per_s", 0) or 0)
            burst = float(entry.get("burst", max(rate, 1.0)) or max(rate, 1.0))
            bucket = TokenBucket(rate, burst, clock) if rate > 0 else None
            ring.keys[digest] = ApiKey(str(entry.get("name", f"key{n}")), digest, tuple(models), bucket)
        return ring

    @classmethod
    def load(cls, file: str | None, inline: str | None) -> KeyRing | None:
        """The key ring from a file and/or an inline JSON/YAML document; None when neither is set."""
        if not file and not inline:
            return None
        ring = cls()
        if file:
            try:
                doc = yaml.safe_load(Path(file).read_text())
            except (OSError, yaml.YAMLError) as err:
                raise InvalidArgument(f"cannot read API key file {file}: {err}") from err
            ring.keys.update(cls.parse(doc, file).keys)
        if inline:
            try:
                doc = json.loads(inline)
            except json.JSONDecodeError:
                doc = yaml.safe_load(inline)
            ring.keys.update(cls.parse(doc, "FERRY_GATEWAY_API_KEYS").keys)
        return ring

    def lookup(self, presented: str) -> ApiKey | None:
        digest = hash_key(presented)
        for known, key in self.keys.items():
            if hmac.compare_digest(known, digest):
                return key
        return None


def _bearer(metadata: Any) -> str | None:
    for k, v in metadata or ():
        if k.lower() == "authorization":
            value = v.decode() if isinstance(v, bytes) else str(v)
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _model_of(request: Any) -> str | None:
    for attr in ("model_name", "name"):
        value = getattr(request, attr, None)
        if isinstance(value, str):
            return value
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the key, the model globs and the rate limit before a handler runs."""

    def __init__(self, ring: KeyRing, on_deny: Callable[[str], None] | None = None) -> None:
        self.ring = ring
        self.on_deny = on_deny

    def check(self, key: ApiKey | None, model: str | None) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message to answer."""
        if key is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown API key (send 'authorization: Bearer <key>')",
            )
        if model and not key.allows(model):
            return grpc.StatusCode.PERMISSION_DENIED, f"API key {key.name!r} may not use model {model!r}"
        if key.bucket is not None and not key.bucket.take():
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"API key {key.name!r} is over its rate limit of {key.bucket.rate:g} requests/s",
            )
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method in OPEN_METHODS or method.startswith(OPEN_PREFIXES):
            return handler
        token = _bearer(details.invocation_metadata)
        key = self.ring.lookup(token) if token else None
        return self._wrap(handler, key)

    def _deny(self, verdict: tuple[grpc.StatusCode, str]) -> None:
        if self.on_deny is not None:
            self.on_deny(verdict[0].name)

    def _wrap(self, handler: grpc.RpcMethodHandler, key: ApiKey | None) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                verdict = self.check(key, _model_of(request))
                if verdict is not None:
                    self._deny(verdict)
                    await context.abort(*verdict)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                if key is None:
                    verdict = self.check(None, None)
                    assert verdict is not None
                    self._deny(verdict)
                    await context.abort(*verdict)

                async def checked() -> AsyncIterator[Any]:
                    async for request in requests:
                        verdict = self.check(key, _model_of(request))
                        if verdict is not None:
                            self._deny(verdict)
                            await context.abort(*verdict)
                        yield request

                async for item in inner_stream(checked(), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if key is None:

            async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort(*self.check(None, None))  # type: ignore[misc]

            kind = "unary_stream" if handler.unary_stream is not None else "stream_unary"
            factory = getattr(grpc, f"{kind}_rpc_method_handler")
            return factory(
                refuse,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
