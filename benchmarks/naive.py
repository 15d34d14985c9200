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

from benchmarks.floor import AlwaysReady, serve_servicer, server_main
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.codec import add_output, decode_inputs
from ferry.core.errors import NotFound


class NaiveServicer(AlwaysReady):
    def __init__(self, sessions: dict[str, Any], input_name: str, output_name: str) -> None:
        self.sessions = sessions
        self.input_name = input_name
        self.output_name = output_name

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
    await serve_servicer(NaiveServicer(sessions, INPUT_NAME, OUTPUT_NAME), "naive", args)


def main(argv: Sequence[str] | None = None) -> int:
    return server_main("benchmarks.naive", __doc__ or "", serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
