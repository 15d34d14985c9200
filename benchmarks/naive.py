"""The naive server: what a user would write by hand, to see whether Ferry's batching pays.

``python -m benchmarks.naive --store DIR --models mlp,cnn --port 0``

Ferry's own gRPC server (``build_server``: the same options, interceptors and health as every
Ferry service) whose ``ModelInfer`` decodes the request's raw input, runs ONNX Runtime once for
that request alone on the default thread pool (so calls overlap, as a careful hand-written server
would let them), and answers raw. No queue, no batching, no statistics, no metrics: the worker
has to beat this to justify its batcher.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.core.codec import add_output, decode_inputs
from ferry.core.errors import NotFound
from ferry.core.grpcserver import add_servicer, build_server, ready_line, serve_until_signal

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class NaiveServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, sessions: dict[str, Any], input_name: str, output_name: str) -> None:
        self.sessions = sessions
        self.input_name = input_name
        self.output_name = output_name

    async def ServerLive(self, request: pb.ServerLiveRequest, context: object) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: object) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        session = self.sessions.get(request.model_name)
        if session is None:
            raise NotFound(f"model {request.model_name!r} is not served by the naive server")
        x = decode_inputs(request)[self.input_name]
        loop = asyncio.get_running_loop()
        (y,) = await loop.run_in_executor(None, session.run, [self.output_name], {self.input_name: x})
        out = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        add_output(out, self.output_name, np.ascontiguousarray(y))
        return out


async def serve(args: argparse.Namespace) -> None:
    from benchmarks.models import INPUT_NAME, OUTPUT_NAME, session

    store = Path(args.store)
    sessions = {name: session(store / "onnx" / f"{name}.onnx") for name in args.models.split(",")}
    servicer = NaiveServicer(sessions, INPUT_NAME, OUTPUT_NAME)

    def register(server: grpc.aio.Server) -> list[str]:
        return [add_servicer(server, servicer, SERVICE)]

    handle = build_server(args.host, args.port, register, reuse_port=args.reuse_port)
    await serve_until_signal(handle, 2.0, ready_message=ready_line("naive", handle.port))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.naive", description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="the bench store (models exported by ferry bench)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reuse-port", action="store_true")
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
