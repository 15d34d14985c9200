"""The transport floor: Ferry's own gRPC server answering a model that does no work.

``python -m benchmarks.floor --store DIR --models mlp,cnn --port 0``

Built with ``ferry.core.grpcserver.build_server`` (health, reflection, the error
interceptor, the same options as every Ferry service), its ``ModelInfer`` answers
a precomputed response: the benchmark's requests carry the index of their input
in the shared pool as ``id``, and the floor returns the ONNX Runtime answer it
computed and serialized for that input at start-up (a dict lookup, no decoding,
no model run, no serializing).
What a request costs here is gRPC + protobuf + Python and nothing else, so no
server on this machine can answer faster: every other scenario is a ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import numpy as np

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.core.codec import add_output
from ferry.core.errors import NotFound
from ferry.core.grpcserver import add_servicer, build_server, ready_line, serve_until_signal

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class AlwaysReady(pb_grpc.GRPCInferenceServiceServicer):
    """Live and ready from the start: the benchmark's own servers have nothing to load."""

    async def ServerLive(self, request: pb.ServerLiveRequest, context: object) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: object) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)


class FloorServicer(AlwaysReady):
    """Answers from a table of precomputed, serialized responses: ``(model, id) -> bytes``."""

    def __init__(self, answers: dict[str, dict[str, bytes]], classes: int) -> None:
        self.answers = answers
        self.classes = classes

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse | bytes:
        table = self.answers.get(request.model_name)
        if table is None:
            raise NotFound(f"model {request.model_name!r} is not served by the floor")
        answer = table.get(request.id)
        if answer is not None:
            return answer
        # Not a pool input: a zero answer of the right shape, still no work.
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        out = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        add_output(out, "output", np.zeros((rows, self.classes), np.float32))
        return out


def precompute(store: Path, models: Sequence[str], pool_size: int) -> dict[str, dict[str, bytes]]:
    from benchmarks.models import CLASSES, OUTPUT_NAME, input_pool, reference_outputs

    answers: dict[str, dict[str, bytes]] = {}
    for name in models:
        onnx_file = store / "onnx" / f"{name}.onnx"
        expected = reference_outputs(onnx_file, input_pool(name, pool_size))
        table = {}
        for i, row in enumerate(expected):
            out = pb.ModelInferResponse(model_name=name, model_version="1", id=str(i))
            add_output(out, OUTPUT_NAME, row.reshape(1, CLASSES))
            table[str(i)] = out.SerializeToString()
        answers[name] = table
    return answers


async def serve(args: argparse.Namespace) -> None:
    from benchmarks.models import CLASSES

    answers = precompute(Path(args.store), args.models.split(","), args.pool_size)
    servicer = FloorServicer(answers, CLASSES)

    await serve_servicer(servicer, "floor", args)


async def serve_servicer(servicer: object, name: str, args: argparse.Namespace) -> None:
    """A benchmark server on ``build_server`` (every Ferry server's options), until signalled."""

    def register(server: grpc.aio.Server) -> list[str]:
        return [add_servicer(server, servicer, SERVICE)]

    handle = build_server(args.host, args.port, register, reuse_port=args.reuse_port)
    await serve_until_signal(handle, 2.0, ready_message=ready_line(name, handle.port))


def server_main(
    prog: str, doc: str, serve: Callable[[argparse.Namespace], Awaitable[None]], argv: Sequence[str] | None
) -> int:
    """The command line the benchmark's servers share: the bench store, the models, the port."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--store", required=True, help="the bench store (models exported by ferry bench)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--pool-size", type=int, default=16)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reuse-port", action="store_true")
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return server_main("benchmarks.floor", __doc__ or "", serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
