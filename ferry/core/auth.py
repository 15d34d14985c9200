"""Who may call what: API keys, their roles and model globs, and the decision for one call.

Every service (gateway, worker, trainer, exporter) reads the same key file and
asks ``decide`` the same question, so a key means the same thing wherever it
is sent. Keys are never stored: the file (YAML or JSON, or the same document
inline in ``FERRY_<SERVICE>_API_KEYS``) holds their sha256 hex digests::

    keys:
      - name: platform-admin
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        roles: [admin]
      - name: team-a
        sha256: ...
        roles: [infer]                   # infer | read | models | train | admin
        models: ["mlp*", "ranker"]       # fnmatch globs for infer and models; default ["*"]
        rate_per_s: 100                  # sustained calls per second (0 = unlimited)
        burst: 200                       # bucket size

A key without ``roles`` gets ``infer`` and ``read``: what the gateway's keys
could do before roles existed, minus load and unload. This module is pure: no
gRPC, no I/O beyond reading the key file; ``ferry.core.guard`` applies it to calls.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ferry.core.errors import InvalidArgument, PermissionDenied, Unauthenticated

INFER, READ, MODELS, TRAIN, ADMIN = "infer", "read", "models", "train", "admin"
ROLES = (INFER, READ, MODELS, TRAIN, ADMIN)
GLOBBED = frozenset({INFER, MODELS})  # the roles a key's model globs narrow
DEFAULT_ROLES = (INFER, READ)

KSERVE_PREFIX = "/inference.GRPCInferenceService/"  # the v2 service's method names start so
_KSERVE = KSERVE_PREFIX
_TRAINER = "/ferry.v1.Trainer/"
_EXPORTER = "/ferry.v1.Exporter/"
_ADMIN = "/ferry.v1.GatewayAdmin/"
METRICS_METHOD = "/ferry.v1.Http/Metrics"

OPEN_METHODS = frozenset({f"{_KSERVE}ServerLive", f"{_KSERVE}ServerReady", f"{_KSERVE}ServerMetadata"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Rule:
    """What one RPC needs: any of ``roles``; ``target`` names the request field holding the model
    it acts on (dotted for nested messages); ``audit`` marks calls that change state."""

    roles: tuple[str, ...]
    target: str | None = None
    audit: bool = False


# Reading a model's metadata, config or readiness is part of inferring with it (Triton's clients
# ask before they send), so an infer key may do that for the models its globs cover.
RULES: dict[str, Rule] = {
    f"{_KSERVE}ModelReady": Rule((READ, INFER), "name"),
    f"{_KSERVE}ModelMetadata": Rule((READ, INFER), "name"),
    f"{_KSERVE}ModelConfig": Rule((READ, INFER), "name"),
    f"{_KSERVE}ModelInfer": Rule((INFER,), "model_name"),
    f"{_KSERVE}ModelStreamInfer": Rule((INFER,), "model_name"),
    f"{_KSERVE}ModelStatistics": Rule((READ,)),
    f"{_KSERVE}RepositoryIndex": Rule((READ,)),
    f"{_KSERVE}RepositoryModelLoad": Rule((MODELS,), "model_name", audit=True),
    f"{_KSERVE}RepositoryModelUnload": Rule((MODELS,), "model_name", audit=True),
    # Registering makes the worker map host memory the caller names: an operator's right (models),
    # not an infer key's. Region names are not models, so no target and no globs.
    f"{_KSERVE}SystemSharedMemoryStatus": Rule((READ, MODELS)),
    f"{_KSERVE}SystemSharedMemoryRegister": Rule((MODELS,), audit=True),
    f"{_KSERVE}SystemSharedMemoryUnregister": Rule((MODELS,), audit=True),
    f"{_KSERVE}CudaSharedMemoryStatus": Rule((READ, MODELS)),
    f"{_KSERVE}CudaSharedMemoryRegister": Rule((MODELS,), audit=True),
    f"{_KSERVE}CudaSharedMemoryUnregister": Rule((MODELS,), audit=True),
    f"{_ADMIN}ListWorkers": Rule((READ,)),
    f"{_ADMIN}CacheStats": Rule((READ,)),
    # The REST port's Prometheus endpoint: no gRPC method, so it gets a name of its own.
    METRICS_METHOD: Rule((READ,)),
    f"{_TRAINER}SubmitJob": Rule((TRAIN,), "name", audit=True),
    f"{_TRAINER}CancelJob": Rule((TRAIN,), "id", audit=True),
    f"{_TRAINER}UploadDataset": Rule((TRAIN,), "name", audit=True),
    f"{_TRAINER}GetJob": Rule((READ,)),
    f"{_TRAINER}ListJobs": Rule((READ,)),
    f"{_TRAINER}WatchJob": Rule((READ,)),
    f"{_EXPORTER}Export": Rule((MODELS,), "model_name", audit=True),
    f"{_EXPORTER}ImportOnnx": Rule((MODELS,), "header.model_name", audit=True),
    f"{_EXPORTER}DeleteVersion": Rule((MODELS,), "model_name", audit=True),
    f"{_EXPORTER}ListModels": Rule((READ,)),
    f"{_EXPORTER}ListVersions": Rule((READ,)),
    f"{_EXPORTER}GetVersion": Rule((READ,)),
}
# Trainer targets are job names and ids, not models: globs do not apply to the train role.


def is_open(method: str) -> bool:
    """Health, liveness and reflection answer anyone: probes and load balancers carry no key."""
    return method in OPEN_METHODS or method.startswith(OPEN_PREFIXES)


def hash_key(key: str) -> str:
    """What a key file stores for ``key``: its sha256 hex digest (``printf %s KEY | sha256sum``)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One entry of the key file. It holds the digest, never the key."""

    name: str
    digest: str = field(repr=False)
    roles: frozenset[str] = frozenset(DEFAULT_ROLES)
    models: tuple[str, ...] = ("*",)
    rate_per_s: float = 0.0
    burst: float = 1.0

    def allows_model(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


def target_of(request: Any, path: str | None) -> str:
    """The request field a rule names (``header.model_name``), or "" when the message has none."""
    value: Any = request
    for part in (path or "").split(".") if path else ():
        value = getattr(value, part, None)
        if value is None:
            return ""
    return value if isinstance(value, str) else ""


def decide(key: ApiKey | None, method: str, target: str = "") -> None:
    """Raise when ``key`` may not call ``method`` on ``target``; return when it may.

    Methods the table does not know are for ``admin`` keys only: a new RPC is closed until
    someone decides who may call it.
    """
    if is_open(method):
        return
    if key is None:
        raise Unauthenticated("missing or unknown API key (send 'authorization: Bearer <key>')")
    if ADMIN in key.roles:
        return
    rule = RULES.get(method)
    short = method.rsplit("/", 1)[-1]
    if rule is None:
        raise PermissionDenied(f"API key {key.name!r}: {short} is for admin keys only")
    held = [role for role in rule.roles if role in key.roles]
    if not held:
        needs = " or ".join(repr(r) for r in rule.roles)
        raise PermissionDenied(f"API key {key.name!r} lacks the role {needs} that {short} needs")
    if target and all(role in GLOBBED for role in held) and not key.allows_model(target):
        raise PermissionDenied(f"API key {key.name!r} may not use model {target!r}")


def _roles(entry: dict[str, Any], where: str, n: int) -> frozenset[str]:
    roles = entry.get("roles", list(DEFAULT_ROLES))
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not roles:
        raise InvalidArgument(f"{where}: key #{n} 'roles' must be a non-empty list")
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise InvalidArgument(
            f"{where}: key #{n} has unknown roles {unknown}; choose from {', '.join(ROLES)}"
        )
    return frozenset(roles)


@dataclass
class KeyRing:
    """Every key a service accepts, by digest."""

    keys: dict[str, ApiKey] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"KeyRing(names={sorted(k.name for k in self.keys.values())})"

    @classmethod
    def parse(cls, doc: Any, where: str) -> KeyRing:
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
            try:
                rate = float(entry.get("rate_per_s", 0) or 0)
                burst = float(entry.get("burst", 0) or max(rate, 1.0))
            except (TypeError, ValueError) as err:
                raise InvalidArgument(f"{where}: key #{n} rate_per_s and burst must be numbers") from err
            if rate < 0 or burst <= 0:
                raise InvalidArgument(f"{where}: key #{n} needs rate_per_s >= 0 and burst > 0")
            ring.keys[digest] = ApiKey(
                name=str(entry.get("name", f"key{n}")),
                digest=digest,
                roles=_roles(entry, where, n),
                models=tuple(str(m) for m in models),
                rate_per_s=rate,
                burst=burst,
            )
        return ring

    @classmethod
    def load(
        cls, file: str | None, inline: str | None, inline_name: str = "inline API keys"
    ) -> KeyRing | None:
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
                try:
                    doc = yaml.safe_load(inline)
                except yaml.YAMLError as err:
                    raise InvalidArgument(f"{inline_name} is neither JSON nor YAML: {err}") from err
            ring.keys.update(cls.parse(doc, inline_name).keys)
        return ring

    def lookup(self, presented: str) -> ApiKey | None:
        """The key whose digest matches, compared in constant time against every entry."""
        digest = hash_key(presented)
        found = None
        for known, key in self.keys.items():
            if hmac.compare_digest(known, digest):
                found = key
        return found


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, or None."""
    for k, v in metadata or ():
        if k.lower() == "authorization":
            value = v.decode() if isinstance(v, bytes) else str(v)
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; the clock is injectable for tests, and one
    that steps back never takes tokens away."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, n: float = 1.0) -> bool:
        now = self.clock()
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


def check_limits(rate: float, burst: float) -> None:
    """Refuse limits a bucket cannot honour: a zero rate never refills and a TTL needs burst/rate."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of tokens per second, got {rate!r}")
    if not (burst > 0 and math.isfinite(burst)):
        raise ValueError(f"burst must be a positive number of tokens, got {burst!r}")


class Buckets:
    """In-process token buckets, one per key digest (names need not be unique; digests are).

    What every service enforces when nothing shares the count, and the gateway's fallback
    when Redis is out of reach. Digests come from the key file, a bounded set, so buckets are
    never evicted.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, digest: str, rate: float, burst: float, n: float = 1.0) -> bool:
        check_limits(rate, burst)
        bucket = self._buckets.get(digest)
        if bucket is None:
            bucket = self._buckets[digest] = TokenBucket(rate, burst, self._clock)
        return bucket.take(n)
