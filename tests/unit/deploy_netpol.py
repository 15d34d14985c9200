"""NetworkPolicy semantics, small enough to read: may a pod reach another pod's port?

Pure logic over rendered manifests, so the tests can ask the question a CNI answers without a
cluster. It follows the networking.k8s.io/v1 rules: a pod selected by no policy of a direction is
open in that direction; once selected, only what some rule of some selecting policy allows gets
through; a connection needs the sender's egress and the receiver's ingress. Peers are
podSelector (the policy's namespace), namespaceSelector, or both; ipBlock peers match no pod.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    """A pod as policies see it: its namespace (with labels) and its own labels."""

    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    namespace_labels: dict[str, str] = field(default_factory=dict)

    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict[str, Any], policy_ns: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], pod.ns_labels()):
            return False
    elif pod.namespace != policy_ns:
        return False
    return matches(peer.get("podSelector"), pod.labels)


def _ports_match(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports)


def _allowed(
    policies: list[dict[str, Any]], direction: str, subject: Pod, other: Pod, port: int, protocol: str
) -> bool:
    kind = "Ingress" if direction == "ingress" else "Egress"
    peers_key = "from" if direction == "ingress" else "to"
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == subject.namespace
        and kind in p["spec"].get("policyTypes", ["Ingress"])
        and matches(p["spec"]["podSelector"], subject.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(direction) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(
                _peer_matches(x, policy["metadata"]["namespace"], other) for x in peers
            )
            if peer_ok and _ports_match(rule.get("ports"), port, protocol):
                return True
    return False


def can_connect(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
    """True when the sender's egress and the receiver's ingress both let the connection through."""
    return _allowed(policies, "egress", src, dst, port, protocol) and _allowed(
        policies, "ingress", dst, src, port, protocol
    )
