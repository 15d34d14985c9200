"""Schemas for the custom resources the manifests use, which kubernetes-validate cannot know.

Only the cert-manager fields Ferry's TLS component writes, taken from cert-manager's v1 API
reference; strict (no unknown keys), so a misspelt field fails here as it would fail at apply.
"""

from __future__ import annotations

from typing import Any

import jsonschema

_STR: dict[str, Any] = {"type": "string"}
_ISSUER_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {"name": _STR, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": _STR},
}
_USAGES = [
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
]
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": _STR, "namespace": _STR},
}


def _kind(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": _STR,
            "metadata": _METADATA,
            "spec": spec,
        },
    }


SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("cert-manager.io/v1", "Certificate"): _kind(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": _STR,
                "commonName": _STR,
                "dnsNames": {"type": "array", "items": _STR},
                "isCA": {"type": "boolean"},
                "duration": _DURATION,
                "renewBefore": _DURATION,
                "usages": {"type": "array", "items": {"enum": _USAGES}},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    },
                },
                "issuerRef": _ISSUER_REF,
            },
        }
    ),
    ("cert-manager.io/v1", "Issuer"): _kind(
        {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "selfSigned": {"type": "object", "additionalProperties": False},
                "ca": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["secretName"],
                    "properties": {"secretName": _STR},
                },
            },
        }
    ),
}


def crd_errors(doc: dict[str, Any]) -> list[str] | None:
    """Errors against our schema for a custom resource; None when the kind is not one of ours."""
    schema = SCHEMAS.get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if schema is None:
        return None
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
