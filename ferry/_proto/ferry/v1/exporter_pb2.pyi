from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportOptions(_message.Message):
    __slots__ = ("precision", "quantization", "opset", "atol", "rtol", "min_top1_agreement", "max_metric_drop", "max_batch_size", "parity_samples", "checkpoint", "optimization", "parity_batch")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    RTOL_FIELD_NUMBER: _ClassVar[int]
    MIN_TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_METRIC_DROP_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARITY_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    PARITY_BATCH_FIELD_NUMBER: _ClassVar[int]
    precision: str
    quantization: str
    opset: int
    atol: float
    rtol: float
    min_top1_agreement: float
    max_metric_drop: float
    max_batch_size: int
    parity_samples: int
    checkpoint: str
    optimization: str
    parity_batch: int
    def __init__(self, precision: _Optional[str] = ..., quantization: _Optional[str] = ..., opset: _Optional[int] = ..., atol: _Optional[float] = ..., rtol: _Optional[float] = ..., min_top1_agreement: _Optional[float] = ..., max_metric_drop: _Optional[float] = ..., max_batch_size: _Optional[int] = ..., parity_samples: _Optional[int] = ..., checkpoint: _Optional[str] = ..., optimization: _Optional[str] = ..., parity_batch: _Optional[int] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("job_id", "model_name", "options")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_name: str
    options: ExportOptions
    def __init__(self, job_id: _Optional[str] = ..., model_name: _Optional[str] = ..., options: _Optional[_Union[ExportOptions, _Mapping]] = ...) -> None: ...

class StageProgress(_message.Message):
    __slots__ = ("stage", "state", "detail", "elapsed_s")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    stage: str
    state: str
    detail: str
    elapsed_s: float
    def __init__(self, stage: _Optional[str] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class ExportReport(_message.Message):
    __slots__ = ("model_name", "version", "published", "parity_passed", "failure", "meta_json")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    PARITY_PASSED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    published: bool
    parity_passed: bool
    failure: str
    meta_json: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., published: _Optional[bool] = ..., parity_passed: _Optional[bool] = ..., failure: _Optional[str] = ..., meta_json: _Optional[str] = ...) -> None: ...

class ExportEvent(_message.Message):
    __slots__ = ("stage", "report")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    stage: StageProgress
    report: ExportReport
    def __init__(self, stage: _Optional[_Union[StageProgress, _Mapping]] = ..., report: _Optional[_Union[ExportReport, _Mapping]] = ...) -> None: ...

class ImportHeader(_message.Message):
    __slots__ = ("model_name", "max_batch_size", "config_json", "source")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    max_batch_size: int
    config_json: str
    source: str
    def __init__(self, model_name: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., config_json: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ImportChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ImportHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ImportHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImportResponse(_message.Message):
    __slots__ = ("model_name", "version", "meta_json")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    meta_json: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., meta_json: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "versions", "latest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    latest: int
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., latest: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class VersionSummary(_message.Message):
    __slots__ = ("version", "precision", "source", "created_unix_ms", "size_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    precision: str
    source: str
    created_unix_ms: int
    size_bytes: int
    def __init__(self, version: _Optional[int] = ..., precision: _Optional[str] = ..., source: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("model_name", "versions")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionSummary]
    def __init__(self, model_name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionSummary, _Mapping]]] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("model_name", "version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("model_name", "version", "meta_json", "config_json")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    meta_json: str
    config_json: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., meta_json: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class DeleteVersionRequest(_message.Message):
    __slots__ = ("model_name", "version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteVersionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
