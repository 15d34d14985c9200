from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionState(_message.Message):
    __slots__ = ("model", "version", "state")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    state: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("address", "serving", "ejected", "in_flight", "models")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    address: str
    serving: bool
    ejected: bool
    in_flight: int
    models: _containers.RepeatedCompositeFieldContainer[ModelVersionState]
    def __init__(self, address: _Optional[str] = ..., serving: _Optional[bool] = ..., ejected: _Optional[bool] = ..., in_flight: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelVersionState, _Mapping]]] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class CacheStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheStatsResponse(_message.Message):
    __slots__ = ("enabled", "backend", "breaker_state", "hits", "misses", "errors", "skipped", "stores", "too_large", "single_flight_shared", "near_hits", "near_entries", "near_bytes", "near_evictions")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BREAKER_STATE_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    TOO_LARGE_FIELD_NUMBER: _ClassVar[int]
    SINGLE_FLIGHT_SHARED_FIELD_NUMBER: _ClassVar[int]
    NEAR_HITS_FIELD_NUMBER: _ClassVar[int]
    NEAR_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEAR_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEAR_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    backend: str
    breaker_state: str
    hits: int
    misses: int
    errors: int
    skipped: int
    stores: int
    too_large: int
    single_flight_shared: int
    near_hits: int
    near_entries: int
    near_bytes: int
    near_evictions: int
    def __init__(self, enabled: _Optional[bool] = ..., backend: _Optional[str] = ..., breaker_state: _Optional[str] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., errors: _Optional[int] = ..., skipped: _Optional[int] = ..., stores: _Optional[int] = ..., too_large: _Optional[int] = ..., single_flight_shared: _Optional[int] = ..., near_hits: _Optional[int] = ..., near_entries: _Optional[int] = ..., near_bytes: _Optional[int] = ..., near_evictions: _Optional[int] = ...) -> None: ...
