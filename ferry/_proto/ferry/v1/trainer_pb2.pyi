from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAIN_JOB_STATE_UNSPECIFIED: _ClassVar[TrainJobState]
    TRAIN_JOB_STATE_QUEUED: _ClassVar[TrainJobState]
    TRAIN_JOB_STATE_RUNNING: _ClassVar[TrainJobState]
    TRAIN_JOB_STATE_SUCCEEDED: _ClassVar[TrainJobState]
    TRAIN_JOB_STATE_FAILED: _ClassVar[TrainJobState]
    TRAIN_JOB_STATE_CANCELLED: _ClassVar[TrainJobState]
TRAIN_JOB_STATE_UNSPECIFIED: TrainJobState
TRAIN_JOB_STATE_QUEUED: TrainJobState
TRAIN_JOB_STATE_RUNNING: TrainJobState
TRAIN_JOB_STATE_SUCCEEDED: TrainJobState
TRAIN_JOB_STATE_FAILED: TrainJobState
TRAIN_JOB_STATE_CANCELLED: TrainJobState

class TrainModel(_message.Message):
    __slots__ = ("arch", "factory", "params_json")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    arch: str
    factory: str
    params_json: str
    def __init__(self, arch: _Optional[str] = ..., factory: _Optional[str] = ..., params_json: _Optional[str] = ...) -> None: ...

class TrainDataset(_message.Message):
    __slots__ = ("name", "upload", "params_json", "test_fraction", "tokenizer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    name: str
    upload: str
    params_json: str
    test_fraction: float
    tokenizer: TrainTokenizer
    def __init__(self, name: _Optional[str] = ..., upload: _Optional[str] = ..., params_json: _Optional[str] = ..., test_fraction: _Optional[float] = ..., tokenizer: _Optional[_Union[TrainTokenizer, _Mapping]] = ...) -> None: ...

class TrainTokenizer(_message.Message):
    __slots__ = ("kind", "vocab_size", "lowercase")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOWERCASE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    vocab_size: int
    lowercase: bool
    def __init__(self, kind: _Optional[str] = ..., vocab_size: _Optional[int] = ..., lowercase: _Optional[bool] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("model", "dataset", "task", "loss", "optimizer", "lr", "momentum", "weight_decay", "schedule", "step_size", "gamma", "warmup_epochs", "epochs", "batch_size", "val_fraction", "seed", "device", "early_stopping_patience", "early_stopping_min_delta", "grad_clip_norm", "nprocs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    WARMUP_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_MIN_DELTA_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NPROCS_FIELD_NUMBER: _ClassVar[int]
    model: TrainModel
    dataset: TrainDataset
    task: str
    loss: str
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    step_size: int
    gamma: float
    warmup_epochs: int
    epochs: int
    batch_size: int
    val_fraction: float
    seed: int
    device: str
    early_stopping_patience: int
    early_stopping_min_delta: float
    grad_clip_norm: float
    nprocs: int
    def __init__(self, model: _Optional[_Union[TrainModel, _Mapping]] = ..., dataset: _Optional[_Union[TrainDataset, _Mapping]] = ..., task: _Optional[str] = ..., loss: _Optional[str] = ..., optimizer: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., schedule: _Optional[str] = ..., step_size: _Optional[int] = ..., gamma: _Optional[float] = ..., warmup_epochs: _Optional[int] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., val_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., device: _Optional[str] = ..., early_stopping_patience: _Optional[int] = ..., early_stopping_min_delta: _Optional[float] = ..., grad_clip_norm: _Optional[float] = ..., nprocs: _Optional[int] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("epoch", "epochs", "step", "steps_per_epoch", "loss", "samples_per_second", "eta_seconds", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float
    samples_per_second: float
    eta_seconds: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., step: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ..., loss: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TrainJob(_message.Message):
    __slots__ = ("id", "name", "state", "spec_json", "progress", "error", "created_ms", "started_ms", "finished_ms", "checkpoints", "test_metrics", "attempts", "resumed_from")
    class TestMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_MS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    TEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    state: TrainJobState
    spec_json: str
    progress: TrainProgress
    error: str
    created_ms: int
    started_ms: int
    finished_ms: int
    checkpoints: _containers.RepeatedScalarFieldContainer[str]
    test_metrics: _containers.ScalarMap[str, float]
    attempts: int
    resumed_from: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[TrainJobState, str]] = ..., spec_json: _Optional[str] = ..., progress: _Optional[_Union[TrainProgress, _Mapping]] = ..., error: _Optional[str] = ..., created_ms: _Optional[int] = ..., started_ms: _Optional[int] = ..., finished_ms: _Optional[int] = ..., checkpoints: _Optional[_Iterable[str]] = ..., test_metrics: _Optional[_Mapping[str, float]] = ..., attempts: _Optional[int] = ..., resumed_from: _Optional[str] = ...) -> None: ...

class TrainSubmitRequest(_message.Message):
    __slots__ = ("spec", "name")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    spec: TrainSpec
    name: str
    def __init__(self, spec: _Optional[_Union[TrainSpec, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class TrainGetRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class TrainListRequest(_message.Message):
    __slots__ = ("states", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[TrainJobState]
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[TrainJobState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class TrainListResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[TrainJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[TrainJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TrainWatchRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class TrainEvent(_message.Message):
    __slots__ = ("kind", "job")
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    kind: str
    job: TrainJob
    def __init__(self, kind: _Optional[str] = ..., job: _Optional[_Union[TrainJob, _Mapping]] = ...) -> None: ...

class TrainCancelRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DatasetChunk(_message.Message):
    __slots__ = ("name", "format", "data", "sha256", "overwrite")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: str
    data: bytes
    sha256: str
    overwrite: bool
    def __init__(self, name: _Optional[str] = ..., format: _Optional[str] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class DatasetUploadResponse(_message.Message):
    __slots__ = ("name", "size_bytes", "sha256", "x_shape", "classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    X_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    sha256: str
    x_shape: _containers.RepeatedScalarFieldContainer[int]
    classes: int
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., x_shape: _Optional[_Iterable[int]] = ..., classes: _Optional[int] = ...) -> None: ...
