"""API keys: parsing the key file, model globs, token bucket, the verdicts the interceptor gives."""

from __future__ import annotations

import json

import grpc
import pytest

from ferry.core.errors import InvalidArgument
from gateway.auth import AuthInterceptor, KeyRing, TokenBucket, _bearer, hash_key


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def ring(clock: Clock | None = None) -> KeyRing:
    doc = {
        "keys": [
            {
                "name": "team-a",
                "sha256": hash_key("secret-a"),
                "models": ["mlp*"],
                "rate_per_s": 2,
                "burst": 2,
            },
            {"name": "admin", "sha256": hash_key("secret-b")},
        ]
    }
    return KeyRing.parse(doc, "test", clock=clock or Clock())


def test_token_bucket_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=2, clock=clock)
    assert bucket.take() and bucket.take() and not bucket.take()
    clock.now += 0.5
    assert bucket.take() and not bucket.take()


def test_keys_are_matched_by_hash_and_globs() -> None:
    keys = ring()
    a = keys.lookup("secret-a")
    assert a is not None and a.name == "team-a"
    assert a.allows("mlp") and a.allows("mlp-large") and not a.allows("cnn")
    assert keys.lookup("secret-b").allows("anything")  # type: ignore[union-attr]
    assert keys.lookup("wrong") is None


def test_verdicts_name_the_problem() -> None:
    clock = Clock()
    keys = ring(clock)
    auth = AuthInterceptor(keys)
    assert auth.check(None, "mlp") == (
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or unknown API key (send 'authorization: Bearer <key>')",
    )
    a = keys.lookup("secret-a")
    assert auth.check(a, "cnn") == (
        grpc.StatusCode.PERMISSION_DENIED,
        "API key 'team-a' may not use model 'cnn'",
    )
    assert auth.check(a, "mlp") is None and auth.check(a, "mlp") is None
    assert auth.check(a, "mlp") == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "API key 'team-a' is over its rate limit of 2 requests/s",
    )
    clock.now += 1
    assert auth.check(a, "mlp") is None


def test_bearer_metadata_parsing() -> None:
    assert _bearer([("authorization", "Bearer abc")]) == "abc"
    assert _bearer([("authorization", "bearer  abc ")]) == "abc"
    assert _bearer([("authorization", "Basic abc")]) is None
    assert _bearer([("x-other", "1")]) is None


def test_key_file_and_inline_document(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - name: a\n    sha256: {hash_key('k1')}\n    models: mlp\n")
    inline = json.dumps({"keys": [{"name": "b", "sha256": hash_key("k2")}]})
    keys = KeyRing.load(str(f), inline)
    assert keys is not None
    assert keys.lookup("k1").models == ("mlp",)  # type: ignore[union-attr]
    assert keys.lookup("k2") is not None
    assert KeyRing.load(None, None) is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"keys": [{"name": "x", "sha256": "abc"}]}, "key #0 needs 'sha256', the hex sha256 of the key"),
        ({"nokeys": []}, "expected a mapping with a 'keys' list"),
        ({"keys": ["plain"]}, "key #0 is not a mapping"),
    ],
)
def test_bad_key_documents_are_rejected(doc: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        KeyRing.parse(doc, "keys.yaml")
