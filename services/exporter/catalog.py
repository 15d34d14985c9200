"""What the store holds: models, their versions, one version's report; and deleting a version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferry.core.errors import InvalidArgument, NotFound
from ferry.core.store import Store, validate_name, weight_bytes


@dataclass
class VersionSummary:
    version: int
    precision: str
    source: str
    created_unix_ms: int
    size_bytes: int


def list_models(store: Store) -> list[tuple[str, list[int]]]:
    """Models with at least one published version, with their versions."""
    found = [(name, store.list_versions(name)) for name in store.list_models()]
    return [(name, versions) for name, versions in found if versions]


def _known(store: Store, model: str) -> list[int]:
    validate_name(model, "model name")
    versions = store.list_versions(model)
    if not versions:
        raise NotFound(f"model {model!r} has no published versions in the store")
    return versions


def list_versions(store: Store, model: str) -> list[VersionSummary]:
    out = []
    for version in _known(store, model):
        meta = store.read_meta(model, version) or {}
        source = meta.get("source") or {}
        out.append(
            VersionSummary(
                version=version,
                precision=str(meta.get("precision", "")),
                source=str(source.get("job_id") or source.get("kind") or ""),
                created_unix_ms=int(meta.get("created_unix_ms", 0)),
                size_bytes=weight_bytes(store.version_dir(model, version)),
            )
        )
    return out


def get_version(store: Store, model: str, version: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(version, meta, config) of ``version``, or of the latest when ``version`` is 0."""
    versions = _known(store, model)
    if version < 0:
        raise InvalidArgument(f"invalid version {version}: versions are positive integers (0: latest)")
    chosen = version or versions[-1]
    if chosen not in versions:
        raise NotFound(f"model {model!r} has no version {chosen} (versions: {versions})")
    meta = store.read_meta(model, chosen) or {}
    meta["version"] = chosen
    return chosen, meta, store.read_config(model) or {}


def delete_version(store: Store, model: str, version: int) -> None:
    validate_name(model, "model name")
    if version < 1:
        raise InvalidArgument(f"invalid version {version}: versions are positive integers")
    store.delete_version(model, version)
