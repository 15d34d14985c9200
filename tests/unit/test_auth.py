"""The auth decision, key file parsing, token buckets and the protected-mode rule, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry._proto.ferry.v1 import exporter_pb2, trainer_pb2
from ferry._proto.inference import grpc_service_pb2
from ferry.core.auth import (
    METRICS_METHOD,
    RULES,
    KeyRing,
    TokenBucket,
    bearer,
    decide,
    hash_key,
    is_open,
    target_of,
)
from ferry.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from ferry.core.security import exposure_problem, is_loopback

KSERVE = "/inference.GRPCInferenceService/"


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def ring() -> KeyRing:
    doc = {
        "keys": [
            {"name": "team-a", "sha256": hash_key("secret-a"), "roles": ["infer"], "models": ["mlp*"]},
            {"name": "ops", "sha256": hash_key("secret-o"), "roles": ["read", "models"], "models": ["mlp"]},
            {"name": "root", "sha256": hash_key("secret-r"), "roles": ["admin"]},
            {"name": "legacy", "sha256": hash_key("secret-l")},
            {"name": "trainer", "sha256": hash_key("secret-t"), "roles": "train"},
        ]
    }
    return KeyRing.parse(doc, "test")


def key(secret: str):  # type: ignore[no-untyped-def]
    found = ring().lookup(secret)
    assert found is not None
    return found


def test_every_rpc_of_every_service_has_a_rule_or_is_open() -> None:
    """A new RPC left out of the table would be admin-only; this names it instead of hiding it."""
    services = [
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        trainer_pb2.DESCRIPTOR.services_by_name["Trainer"],
        exporter_pb2.DESCRIPTOR.services_by_name["Exporter"],
    ]
    from ferry._proto.ferry.v1 import admin_pb2

    services.append(admin_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"])
    methods = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    unruled = sorted(m for m in methods if m not in RULES and not is_open(m))
    assert unruled == []
    # no rule for a method that does not exist (the REST port's /metrics is the one rule with no RPC)
    assert set(RULES) - {METRICS_METHOD} <= methods


def test_no_key_is_unauthenticated_except_on_open_methods() -> None:
    with pytest.raises(Unauthenticated, match="missing or unknown API key"):
        decide(None, KSERVE + "ModelInfer", "mlp")
    decide(None, KSERVE + "ServerLive")
    decide(None, "/grpc.health.v1.Health/Check")


@pytest.mark.parametrize(
    ("secret", "method", "target", "allowed"),
    [
        ("secret-a", "ModelInfer", "mlp-large", True),
        ("secret-a", "ModelInfer", "cnn", False),  # outside its globs
        ("secret-a", "ModelMetadata", "mlp", True),  # reading what it may infer with
        ("secret-a", "ModelMetadata", "cnn", False),
        ("secret-a", "RepositoryIndex", "", False),  # listing needs read
        ("secret-a", "RepositoryModelUnload", "mlp", False),
        ("secret-a", "RepositoryModelLoad", "mlp", False),
        ("secret-o", "RepositoryModelUnload", "mlp", True),
        ("secret-o", "RepositoryModelUnload", "mlp2", False),  # models globs apply too
        ("secret-o", "ModelMetadata", "cnn", True),  # read is not narrowed by globs
        ("secret-o", "ModelInfer", "mlp", False),
        ("secret-l", "ModelInfer", "anything", True),  # no roles: infer + read
        ("secret-l", "RepositoryModelLoad", "anything", False),
        ("secret-r", "RepositoryModelLoad", "anything", True),
    ],
)
def test_roles_and_globs(secret: str, method: str, target: str, allowed: bool) -> None:
    if allowed:
        decide(key(secret), KSERVE + method, target)
    else:
        with pytest.raises(PermissionDenied, match="API key '"):
            decide(key(secret), KSERVE + method, target)


def test_trainer_and_exporter_roles() -> None:
    decide(key("secret-t"), "/ferry.v1.Trainer/SubmitJob", "job-1")
    decide(key("secret-t"), "/ferry.v1.Trainer/UploadDataset", "")
    with pytest.raises(PermissionDenied, match="lacks the role 'read' that ListJobs needs"):
        decide(key("secret-t"), "/ferry.v1.Trainer/ListJobs")
    for method in ("SubmitJob", "CancelJob", "UploadDataset"):
        with pytest.raises(PermissionDenied, match=f"lacks the role 'train' that {method} needs"):
            decide(key("secret-a"), f"/ferry.v1.Trainer/{method}")
    for method in ("Export", "ImportOnnx", "DeleteVersion"):
        with pytest.raises(PermissionDenied, match=f"'models' that {method} needs"):
            decide(key("secret-a"), f"/ferry.v1.Exporter/{method}", "mlp")
    decide(key("secret-o"), "/ferry.v1.Exporter/Export", "mlp")
    decide(key("secret-o"), "/ferry.v1.Exporter/ListModels")


def test_unknown_methods_are_for_admin_keys_only() -> None:
    with pytest.raises(PermissionDenied, match="Frobnicate is for admin keys only"):
        decide(key("secret-o"), "/ferry.v1.Nope/Frobnicate")
    decide(key("secret-r"), "/ferry.v1.Nope/Frobnicate")


def test_targets_come_from_the_field_the_rule_names() -> None:
    chunk = exporter_pb2.ImportChunk(header=exporter_pb2.ImportHeader(model_name="m"))
    assert target_of(chunk, RULES["/ferry.v1.Exporter/ImportOnnx"].target) == "m"
    assert target_of(exporter_pb2.ImportChunk(data=b"x"), "header.model_name") == ""
    request = trainer_pb2.TrainCancelRequest(id="job-9")
    assert target_of(request, RULES["/ferry.v1.Trainer/CancelJob"].target) == "job-9"
    assert target_of(request, None) == ""


def test_keys_are_matched_by_hash_in_constant_time_over_every_entry() -> None:
    keys = ring()
    assert keys.lookup("secret-a").name == "team-a"  # type: ignore[union-attr]
    assert keys.lookup("wrong") is None
    assert "secret" not in repr(keys) and hash_key("secret-a") not in repr(keys)


def test_token_bucket_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=2, clock=clock)
    assert bucket.take() and bucket.take() and not bucket.take()
    clock.now += 0.5
    assert bucket.take() and not bucket.take()


def test_bearer_metadata_parsing() -> None:
    assert bearer([("authorization", "Bearer abc")]) == "abc"
    assert bearer([("authorization", "bearer  abc ")]) == "abc"
    assert bearer([("authorization", "Basic abc")]) is None
    assert bearer([("x-other", "1")]) is None


def test_key_file_and_inline_document(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - name: a\n    sha256: {hash_key('k1')}\n    models: mlp\n    roles: [models]\n")
    inline = json.dumps({"keys": [{"name": "b", "sha256": hash_key("k2"), "rate_per_s": 5}]})
    keys = KeyRing.load(str(f), inline)
    assert keys is not None
    a, b = keys.lookup("k1"), keys.lookup("k2")
    assert a is not None and a.models == ("mlp",) and a.roles == {"models"}
    assert b is not None and b.roles == {"infer", "read"} and (b.rate_per_s, b.burst) == (5, 5)
    assert KeyRing.load(None, None) is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"keys": [{"name": "x", "sha256": "abc"}]}, "key #0 needs 'sha256', the hex sha256 of the key"),
        ({"nokeys": []}, "expected a mapping with a 'keys' list"),
        ({"keys": ["plain"]}, "key #0 is not a mapping"),
        ({"keys": [{"sha256": "a" * 64, "roles": ["root"]}]}, r"unknown roles \['root'\]"),
        ({"keys": [{"sha256": "a" * 64, "roles": []}]}, "'roles' must be a non-empty list"),
        ({"keys": [{"sha256": "a" * 64, "rate_per_s": "fast"}]}, "must be numbers"),
        ({"keys": [{"sha256": "a" * 64, "rate_per_s": -1}]}, "rate_per_s >= 0"),
    ],
)
def test_bad_key_documents_are_rejected(doc: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        KeyRing.parse(doc, "keys.yaml")


def test_unreadable_key_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"cannot read API key file .*nope\.yaml"):
        KeyRing.load(str(tmp_path / "nope.yaml"), None)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("", False), ("::", False), ("10.1.2.3", False), ("ferry.internal", False)],
)  # fmt: skip
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_protected_mode_rule() -> None:
    assert exposure_problem("127.0.0.1", auth=False, mtls=False, insecure=False) is None
    problem = exposure_problem("0.0.0.0", auth=False, mtls=False, insecure=False)
    assert problem is not None and "--api-keys-file" in problem and "--insecure" in problem
    assert exposure_problem("0.0.0.0", auth=True, mtls=False, insecure=False) is None
    assert exposure_problem("0.0.0.0", auth=False, mtls=True, insecure=False) is None
    assert exposure_problem("0.0.0.0", auth=False, mtls=False, insecure=True) is None


def test_a_guarded_call_and_its_handler_share_one_request_id() -> None:
    """The id the guard's audit line carries is the one the handler logs and forwards, also when
    the caller sent none (it used to generate two different ones)."""
    import contextvars

    from ferry.core import guard

    assert guard.request_id_of([("x-request-id", "r" * 200)]) == "r" * 128
    fresh = guard.request_id_of([])
    assert fresh and fresh != guard.request_id_of([])

    def inside_a_call() -> str:
        guard._request_id.set(fresh)
        return guard.current_request_id([])

    assert contextvars.copy_context().run(inside_a_call) == fresh
    assert guard.current_request_id([("x-request-id", "abc")]) == "abc"  # outside any guarded call
