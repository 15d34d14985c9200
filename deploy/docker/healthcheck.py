"""Container health probe: ask a Ferry service's ``grpc.health.v1`` service whether it serves.

Docker has no native gRPC health check, and the kubelet's native ``grpc:`` probe speaks
plaintext only, so images and TLS-enabled pods run this script instead. It depends on
nothing but ``grpcio`` and ``grpcio-health-checking``, which every Ferry image already has.

Exit codes follow Docker's HEALTHCHECK contract: 0 when the service answers SERVING,
1 otherwise (NOT_SERVING, unreachable, timed out, TLS failure); the reason goes to stdout,
which ``docker inspect`` shows. Every option can also come from the environment, so an
image sets ``FERRY_HEALTHCHECK_PORT`` once and the check follows a service whose port changed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ENV = "FERRY_HEALTHCHECK_"


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Exit 0 when the gRPC service on HOST:PORT is SERVING.")
    parser.add_argument("--host", default=env(f"{ENV}HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env(f"{ENV}PORT", "0")))
    parser.add_argument(
        "--service", default=env(f"{ENV}SERVICE", ""), help="health service name; '' = server"
    )
    parser.add_argument("--timeout", type=float, default=float(env(f"{ENV}TIMEOUT", "2.5")))
    parser.add_argument("--tls-ca", default=env(f"{ENV}TLS_CA"), help="CA bundle; enables TLS")
    parser.add_argument("--tls-cert", default=env(f"{ENV}TLS_CERT"), help="client certificate (mTLS)")
    parser.add_argument("--tls-key", default=env(f"{ENV}TLS_KEY"), help="client key (mTLS)")
    parser.add_argument(
        "--tls-server-name", default=env(f"{ENV}TLS_SERVER_NAME"), help="name the certificate must carry"
    )
    return parser


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """One health call; returns (serving, a one-line reason)."""
    if args.port <= 0:
        return False, "no port: pass --port or set FERRY_HEALTHCHECK_PORT"
    target = f"{args.host}:{args.port}"
    if args.tls_ca or args.tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(args.tls_ca),
            private_key=_read(args.tls_key),
            certificate_chain=_read(args.tls_cert),
        )
        options = []
        if args.tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.tls_server_name))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            return False, f"{target}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    serving, reason = check(args)
    print(reason, flush=True)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
