"""The export pipeline: finished job -> ONNX -> checked -> optimised -> precision -> gate -> publish.

Each stage reports ``started``/``done`` through a progress callback (the servicer
streams them). Everything is assembled in a private temporary folder; only a
version that passed its parity gate is handed to ``Store.publish_version``, which
stages it and publishes it in one rename, so a failed export leaves the store
untouched and a worker never sees half a version. ``run`` blocks: the servicer
runs it on a thread pool so the server's event loop stays responsive.

A text job's version also holds its checkpoint's ``tokenizer.json``, and its ``config.json`` a
``text`` entry (the worker takes raw UTF-8 texts on a BYTES input ``text`` and tokenizes them
with that file, cut at the job's ``max_length``) and ``sequence_buckets`` up to the same length.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core import external_data, tracing
from ferry.core.classify import LABELS_FILE, write_labels
from ferry.core.errors import Cancelled, FailedPrecondition, InvalidArgument
from ferry.core.modelconfig import ModelSpec, TensorSpec, spec_to_config
from ferry.core.store import MODEL_FILE, CheckpointFiles, Store, validate_name
from services.exporter import parity, precision
from services.exporter.isolated import IsolatedModel
from services.exporter.runtime import measure_latency, ort_outputs, ort_session, torch_outputs, torch_to_onnx
from services.exporter.samples import Samples, held_out
from services.exporter.settings import ExporterSettings
from services.exporter.source import Checkpoint, load_checkpoint, vocab_size

TEXT_INPUT = "text"  # the BYTES input a text model's clients send their texts to
STAGES = ("load", "export", "check", "optimize", "precision", "parity", "package", "publish")
Progress = Callable[[str, str, str, float], None]


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    quantization: str = "dynamic"
    opset: int = 17
    atol: float = 1e-4
    rtol: float = 1e-4
    min_top1_agreement: float = 0.99
    max_metric_drop: float = 1.0
    max_batch_size: int = 64
    parity_samples: int = 256
    parity_batch: int = 32
    checkpoint: str = "final"
    optimization: str = "basic"


def resolve_options(given: dict[str, Any], settings: ExporterSettings) -> ExportOptions:
    """Fill unset (zero / empty) request options from the settings and check them."""

    def pick(key: str, default: Any) -> Any:
        value = given.get(key)
        return default if value in (None, 0, 0.0, "") else value

    opts = ExportOptions(
        precision=str(pick("precision", "fp32")).lower(),
        quantization=str(pick("quantization", "dynamic")).lower(),
        opset=int(pick("opset", settings.opset)),
        atol=float(pick("atol", settings.atol)),
        rtol=float(pick("rtol", settings.rtol)),
        min_top1_agreement=float(pick("min_top1_agreement", settings.min_top1_agreement)),
        max_metric_drop=float(pick("max_metric_drop", settings.max_metric_drop)),
        max_batch_size=int(pick("max_batch_size", settings.max_batch_size)),
        parity_samples=int(pick("parity_samples", settings.parity_samples)),
        parity_batch=int(pick("parity_batch", settings.parity_batch)),
        checkpoint=str(pick("checkpoint", "final")),
        optimization=str(pick("optimization", settings.optimization)).lower(),
    )
    if opts.precision not in precision.PRECISIONS:
        raise InvalidArgument(f"unknown precision {opts.precision!r}; choose one of fp32, fp16, int8")
    if opts.quantization not in precision.QUANTIZATIONS:
        raise InvalidArgument(f"unknown quantization {opts.quantization!r}; choose dynamic or static")
    if opts.optimization not in precision.OPTIMIZATIONS:
        raise InvalidArgument(f"unknown optimization {opts.optimization!r}; choose none, basic or extended")
    if not 11 <= opts.opset <= 20:
        raise InvalidArgument(f"opset {opts.opset} is out of range: the exporter supports 11 to 20")
    if opts.atol < 0 or opts.rtol < 0 or not 0 < opts.min_top1_agreement <= 1 or opts.max_metric_drop < 0:
        raise InvalidArgument("parity tolerances must be >= 0 and min_top1_agreement within (0, 1]")
    if opts.max_batch_size < 1 or opts.parity_samples < 2 or opts.parity_batch < 2:
        raise InvalidArgument("max_batch_size must be >= 1, parity_samples and parity_batch >= 2")
    if opts.parity_samples > settings.max_parity_samples:
        raise InvalidArgument(
            f"parity_samples {opts.parity_samples} is over this exporter's limit "
            f"(max_parity_samples={settings.max_parity_samples})"
        )
    if opts.max_batch_size > settings.max_batch_size_limit:
        raise InvalidArgument(
            f"max_batch_size {opts.max_batch_size} is over this exporter's limit "
            f"(max_batch_size_limit={settings.max_batch_size_limit})"
        )
    validate_name(opts.checkpoint, "checkpoint tag")
    return opts


@dataclass
class ExportResult:
    model_name: str
    version: int = 0
    published: bool = False
    parity_passed: bool = False
    failure: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def export_onnx(ckpt: Checkpoint, example: np.ndarray, path: Path, opset: int) -> Path:
    """The checkpoint's module as ONNX, with a dynamic batch axis and one per variable input dim."""
    axes = {0: "batch"}
    for i, dim in enumerate(ckpt.input["shape"]):
        if dim == -1:
            axes[i + 1] = "sequence" if i == 0 else f"dim{i + 1}"
    names = (ckpt.input["name"], ckpt.output["name"])
    if isinstance(ckpt.module, IsolatedModel):
        ckpt.module.to_onnx(example, path, opset, names, axes)
    else:
        torch_to_onnx(ckpt.module, example, path, opset, names, axes)
    return path


def with_external_data(served: Path, folder: Path, threshold: int) -> tuple[Path, dict[str, int]]:
    """The served model as it is published, and its external-data files by name with their sizes.

    A model whose graph and weights together are at most ``threshold`` bytes, all inline, is
    published as it is. A larger one (or one whose data is already external: torch writes a
    model over 2 GiB that way, a file per tensor) is written again into ``folder`` as
    ``model.onnx`` with every tensor of 1 KiB or more in one ``model.onnx.data`` beside it."""
    present = external_data.check_model_file(served)
    if not present and served.stat().st_size <= threshold:
        return served, {}
    import onnx

    model = onnx.load(str(served))  # with its external data, if any
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / MODEL_FILE
    onnx.save_model(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=external_data.DATA_FILE,
        size_threshold=1024,
    )
    return out, external_data.check_model_file(out)


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # onnx raises ValidationError and friends
        raise FailedPrecondition(f"the exported ONNX graph fails onnx.checker: {err}") from err


@dataclass
class _Layout:
    """One batch layout of the gate with torch's answers, computed once for every candidate file."""

    name: str
    x: np.ndarray
    batch: int
    labels: np.ndarray | None
    reference: np.ndarray


def _reference(ckpt: Checkpoint, x: np.ndarray, batch: int) -> np.ndarray:
    """torch's answers: here for a zoo model, in the model's own process for a factory."""
    if isinstance(ckpt.module, IsolatedModel):
        return ckpt.module.forward(x, batch)
    return torch_outputs(ckpt.module, x, batch)


def _layouts(ckpt: Checkpoint, samples: Samples, batch: int) -> list[_Layout]:
    sets = [("", samples.inputs, samples.labels)]
    if samples.alt_inputs is not None:
        sets.append((f"@len{samples.alt_inputs.shape[1]}", samples.alt_inputs, None))
    layouts = []
    for suffix, x, labels in sets:
        few = x[: min(8, len(x))]
        few_labels = None if labels is None else labels[: len(few)]
        layouts.append(_Layout(f"batch1{suffix}", few, 1, few_labels, _reference(ckpt, few, 1)))
        layouts.append(_Layout(f"batch{batch}{suffix}", x, batch, labels, _reference(ckpt, x, batch)))
    return layouts


def _cases(ckpt: Checkpoint, layouts: list[_Layout], session: Any) -> list[parity.Case]:
    name, out = ckpt.input["name"], ckpt.output["name"]
    return [
        parity.Case(
            lay.name, {out: lay.reference}, {out: ort_outputs(session, name, lay.x, lay.batch)}, lay.labels
        )
        for lay in layouts
    ]


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


class ExportPipeline:
    """Runs exports against one store with one set of settings; safe to call from many threads."""

    def __init__(self, store: Store, settings: ExporterSettings) -> None:
        self.store = store
        self.settings = settings

    def run(
        self,
        job_id: str,
        model_name: str,
        opts: ExportOptions,
        progress: Progress | None = None,
        cancelled: threading.Event | None = None,
    ) -> ExportResult:
        """Export ``job_id`` as the next version of ``model_name``; raises Ferry errors for bad input."""
        validate_name(model_name, "model name")
        validate_name(job_id, "job id")
        stages: dict[str, float] = {}
        notify = progress or (lambda *_: None)

        @contextmanager
        def stage(name: str, detail: str = "") -> Iterator[dict[str, str]]:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("export cancelled by the client")
            notify(name, "started", detail, 0.0)
            t0 = time.perf_counter()
            done = {"detail": ""}
            with tracing.span(f"export.{name}", **{"ferry.detail": detail}):
                yield done
            stages[name] = round(time.perf_counter() - t0, 4)
            notify(name, "done", done["detail"], stages[name])

        span = tracing.span("export", **{"ferry.job": job_id, "ferry.model": model_name})
        with span, tempfile.TemporaryDirectory(prefix="ferry-export-") as tmp, ExitStack() as cleanup:
            work = Path(tmp)
            with stage("load", f"job {job_id}, checkpoint {opts.checkpoint}") as s:
                ckpt = self._load(job_id, opts.checkpoint)
                cleanup.callback(getattr(ckpt.module, "close", lambda: None))
                samples = held_out(
                    ckpt.spec,
                    opts.parity_samples,
                    self.settings.seed,
                    vocab_size(ckpt.spec),
                    self.store.root,
                    tokenizer=ckpt.tokenizer,
                )
                kind = getattr(ckpt.module, "kind", type(ckpt.module).__name__)
                s["detail"] = f"{kind}, {len(samples)} {samples.source} samples"
            with stage("export", f"opset {opts.opset}") as s:
                raw = export_onnx(ckpt, samples.inputs[:2], work / "exported.onnx", opts.opset)
                s["detail"] = f"{raw.stat().st_size} bytes"
            with stage("check"):
                check_onnx(raw)
            with stage("optimize", opts.optimization) as s:
                fp32 = precision.optimize(raw, work / "fp32.onnx", opts.optimization)
                s["detail"] = f"{fp32.stat().st_size} bytes"
            with stage("precision", opts.precision) as s:
                served, calibrated = self._precision(ckpt, opts, fp32, work)
                threshold = self.settings.external_data_threshold_bytes
                served, external = with_external_data(served, work / "published", threshold)
                s["detail"] = f"{served.stat().st_size} bytes" + "".join(
                    f", external data {name} {size} bytes" for name, size in external.items()
                )
                if calibrated:
                    s["detail"] += f", calibrated on {calibrated['samples']} {calibrated['source']} samples"
            with stage("parity", f"{opts.precision}, batch 1 and {opts.parity_batch}") as s:
                report = self._gate(ckpt, opts, samples, fp32, served)
                s["detail"] = "passed" if report["passed"] else f"failed: {report['failure']}"
            meta = self._meta(ckpt, opts, report, raw, fp32, served, stages)
            if external:
                meta["files"]["external_data"] = external
            if calibrated:
                meta["calibration"] = calibrated
            if not report["passed"]:
                return ExportResult(model_name, failure=str(report["failure"]), meta=meta)
            with stage("package") as s:
                meta["latency_ms"] = measure_latency(
                    ort_session(served), ckpt.input["name"], samples.inputs, self.settings.latency_runs
                )
                meta["stages_s"] = stages
                config = self._config(model_name, ckpt, opts)
                files: dict[str, Path | bytes] = {MODEL_FILE: served}
                files.update({name: served.parent / name for name in external})
                if ckpt.class_names:
                    files[LABELS_FILE] = write_labels(work, ckpt.class_names)
                if ckpt.tokenizer is not None:
                    files[CheckpointFiles.TOKENIZER] = ckpt.tokenizer
                s["detail"] = str(meta["latency_ms"])
            with stage("publish") as s:
                version = self.store.publish_version(model_name, files, meta, config)
                s["detail"] = f"{model_name} version {version}"
        meta["version"] = version
        return ExportResult(model_name, version, True, True, "", meta)

    def _load(self, job_id: str, tag: str) -> Checkpoint:
        """The checkpoint, with its module rebuilt here for a zoo model and in a child process for a
        factory (isolated.py): the exporter never imports a factory itself."""
        allowed = self.settings.allowed_factories
        ckpt = load_checkpoint(self.store, job_id, tag, allowed, build=False)
        if "factory" not in ckpt.spec["model"]:
            return load_checkpoint(self.store, job_id, tag, allowed)
        ckpt.module = IsolatedModel(self.store.root, job_id, tag, allowed, self.settings.factory_timeout_s)
        return ckpt

    def _gate(
        self, ckpt: Checkpoint, opts: ExportOptions, samples: Samples, fp32: Path, served: Path
    ) -> dict[str, Any]:
        """fp32: the served graph within atol/rtol. fp16/int8: the fp32 graph within atol/rtol
        first (the conversion itself must be exact), then the served file by top-1 and metric."""
        layouts = _layouts(ckpt, samples, opts.parity_batch)
        exact = parity.GateOptions(precision="fp32", atol=opts.atol, rtol=opts.rtol, task=ckpt.task)
        report = parity.gate(_cases(ckpt, layouts, ort_session(fp32)), exact)
        if opts.precision != "fp32":
            fp32_report = report
            approx = parity.GateOptions(
                precision=opts.precision,
                min_top1_agreement=opts.min_top1_agreement,
                max_metric_drop=opts.max_metric_drop,
                task=ckpt.task,
            )
            report = parity.gate(_cases(ckpt, layouts, ort_session(served)), approx)
            report["fp32_graph"] = fp32_report
            if not fp32_report["passed"]:
                report.update(passed=False, failure=f"fp32 graph: {fp32_report['failure']}")
        report["samples_source"] = samples.source
        return report

    def _precision(
        self, ckpt: Checkpoint, opts: ExportOptions, fp32: Path, work: Path
    ) -> tuple[Path, dict[str, Any] | None]:
        """The served graph, and for static int8 where its calibration samples came from.

        Calibration reads the train split: the parity gate then measures on test rows the
        quantiser has never seen, so a static model cannot pass on data it was fitted to.
        """
        if opts.precision == "fp16":
            return precision.to_fp16(fp32, work / "fp16.onnx"), None
        if opts.precision == "int8":
            calibration: list[np.ndarray] = []
            calibrated: dict[str, Any] | None = None
            if opts.quantization == "static":
                cal = held_out(
                    ckpt.spec,
                    self.settings.calibration_samples,
                    self.settings.seed + 1,
                    vocab_size(ckpt.spec),
                    self.store.root,
                    split="train",
                    tokenizer=ckpt.tokenizer,
                )
                calibration = [cal.inputs[i : i + 16] for i in range(0, len(cal), 16)]
                calibrated = {"source": cal.source, "samples": len(cal)}
            int8 = precision.to_int8(
                fp32, work / "int8.onnx", opts.quantization, ckpt.input["name"], calibration
            )
            return int8, calibrated
        return fp32, None

    def _config(self, model_name: str, ckpt: Checkpoint, opts: ExportOptions) -> dict[str, Any]:
        spec = ModelSpec(
            name=model_name,
            inputs=(
                TensorSpec(
                    ckpt.input["name"], ckpt.input.get("datatype", "FP32"), tuple(ckpt.input["shape"])
                ),
            ),
            outputs=(TensorSpec(ckpt.output["name"], "FP32", tuple(ckpt.output["shape"])),),
            max_batch_size=opts.max_batch_size,
        )
        config = spec_to_config(spec)
        if ckpt.tokenizer is not None:  # raw texts in, tokenized by the worker (ferry.core.textinput)
            config["text"] = {"input": TEXT_INPUT, "max_length": ckpt.max_length}
            config["sequence_buckets"] = {"max_length": ckpt.max_length}
        return config

    def _meta(
        self,
        ckpt: Checkpoint,
        opts: ExportOptions,
        report: dict[str, Any],
        raw: Path,
        fp32: Path,
        served: Path,
        stages: dict[str, float],
    ) -> dict[str, Any]:
        return {
            "format": 1,
            "created_unix_ms": int(time.time() * 1000),
            "source": {
                "kind": "job",
                "job_id": ckpt.job_id,
                "checkpoint": str(ckpt.path),
                "checkpoint_tag": ckpt.tag,
                "weights_sha256": ckpt.weights_sha256,
                "metrics": ckpt.metrics,
            },
            "model": ckpt.spec.get("model", {}),
            "task": ckpt.task,
            "input": ckpt.input,
            "output": ckpt.output,
            "precision": opts.precision,
            "options": asdict(opts),
            "parity": report,
            "files": {
                "exported_bytes": raw.stat().st_size,
                "optimized_fp32_bytes": fp32.stat().st_size,
                "model_bytes": served.stat().st_size,
            },
            "stages_s": dict(stages),
            "exporter": _versions(),
        }
