"""``ferry export`` (a finished job -> the next model version, stage by stage) and ``ferry models``.

Both talk to an exporter (``--address``/``--exporter``, ``--api-key``: see
``ferry.cli.connect``). ``ferry export`` exits 1 when the parity gate fails, after
printing which output diverged and by how much.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ferry.cli.connect import add_connection_flags, json_arg, resolve


def register(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="export a finished training job as the next version of a model")
    exp.add_argument("job", help="the finished training job's id")
    exp.add_argument("--name", required=True, help="model name to publish under (the export target)")
    exp.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    exp.add_argument("--quantization", choices=["dynamic", "static"], default=None, help="int8 only")
    exp.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    exp.add_argument("--atol", type=float, default=None, help="fp32 gate absolute tolerance")
    exp.add_argument("--rtol", type=float, default=None, help="fp32 gate relative tolerance")
    exp.add_argument("--min-top1", type=float, default=None, help="fp16/int8 gate: top-1 agreement, 0..1")
    exp.add_argument("--max-metric-drop", type=float, default=None, help="fp16/int8 gate: points")
    exp.add_argument("--max-batch-size", type=int, default=None, help="config.json max_batch_size")
    exp.add_argument("--checkpoint", default=None, help="checkpoint tag (default: final)")
    add_connection_flags(exp, "exporter", "--exporter")
    exp.add_argument("--json", action="store_true", help="print the full report as JSON")
    exp.set_defaults(handler=_export)

    models = sub.add_parser("models", help="list models and versions; show, import or delete a version")
    models.add_argument("model", nargs="?", help="a model: list its versions")
    models.add_argument("--version", type=int, default=None, help="show this version's report (0: latest)")
    models.add_argument("--delete", type=int, default=None, metavar="VERSION", help="delete this version")
    models.add_argument("--import", dest="import_file", default=None, metavar="FILE.onnx", help="upload")
    models.add_argument("--max-batch-size", type=int, default=0, help="with --import")
    models.add_argument(
        "--config", type=json_arg, default=None, help="with --import: config.json entries, as a JSON object"
    )
    add_connection_flags(models, "exporter", "--exporter")
    models.set_defaults(handler=_models)


def _export(args: argparse.Namespace) -> int:
    from ferry.client.exporter import ExportStage, SyncExporterClient

    options: dict[str, Any] = {
        "precision": args.precision,
        "quantization": args.quantization,
        "opset": args.opset,
        "atol": args.atol,
        "rtol": args.rtol,
        "min_top1_agreement": args.min_top1,
        "max_metric_drop": args.max_metric_drop,
        "max_batch_size": args.max_batch_size,
        "checkpoint": args.checkpoint,
    }
    started = time.monotonic()

    def show(event: ExportStage) -> None:
        if event.state == "done":
            detail = f" ({event.detail})" if event.detail else ""
            print(f"  {event.stage:<10} done in {event.elapsed_s:.2f}s{detail}", flush=True)

    print(f"exporting job {args.job} as model {args.name} ({args.precision})", flush=True)
    target = resolve(args, "exporter")
    with SyncExporterClient(target.address, **target.options) as client:
        report = client.export(args.job, args.name, on_progress=show, **options)
    if args.json:
        print(json.dumps({**report.__dict__}, indent=2, sort_keys=True))
    if not report.published:
        print(f"parity gate failed, nothing published: {report.failure}", file=sys.stderr)
        return 1
    files, parity = report.meta.get("files", {}), report.meta.get("parity", {})
    print(
        f"published {report.model_name} version {report.version} in {time.monotonic() - started:.1f}s: "
        f"{files.get('model_bytes', 0)} bytes, max abs error {parity.get('summary', {}).get('max_abs_err')}, "
        f"latency {report.meta.get('latency_ms')}"
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from ferry.client.exporter import SyncExporterClient

    target = resolve(args, "exporter")
    with SyncExporterClient(target.address, **target.options) as client:
        if args.model is None:
            for name, versions in client.list_models().items():
                print(f"{name}\tversions {', '.join(map(str, versions))}")
            return 0
        if args.import_file:
            version, _ = client.import_onnx(
                args.model, args.import_file, max_batch_size=args.max_batch_size, config=args.config
            )
            print(f"imported {args.import_file} as {args.model} version {version}")
            return 0
        if args.delete is not None:
            client.delete_version(args.model, args.delete)
            print(f"deleted {args.model} version {args.delete}")
            return 0
        if args.version is not None:
            info = client.get_version(args.model, args.version)
            print(json.dumps({"meta": info.meta, "config": info.config}, indent=2, sort_keys=True))
            return 0
        print("version\tprecision\tsource\tbytes")
        for v in client.list_versions(args.model):
            print(f"{v['version']}\t{v['precision']}\t{v['source']}\t{v['size_bytes']}")
    return 0
