"""The one vocabulary of training-job states, for the trainer, the exporter, the client and the CLI.

The proto's ``TrainJobState`` is the source: ``JobState`` is its values without the
``TRAIN_JOB_STATE_`` prefix (and without UNSPECIFIED), spelled as job records spell them, and a
unit test holds the two to each other.
"""

from __future__ import annotations

from enum import StrEnum
from typing import cast

from ferry._proto.ferry.v1 import trainer_pb2 as pb

PROTO_STATE_PREFIX = "TRAIN_JOB_STATE_"


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    def to_proto(self) -> pb.TrainJobState:
        return cast(pb.TrainJobState, pb.TrainJobState.Value(PROTO_STATE_PREFIX + self.value))

    @classmethod
    def from_proto(cls, value: int) -> JobState:
        """The state of a proto enum value; ValueError for UNSPECIFIED or a value the proto lacks."""
        name = pb.TrainJobState.Name(value) if value in pb.TrainJobState.values() else str(value)
        try:
            return cls(name.removeprefix(PROTO_STATE_PREFIX))
        except ValueError:
            raise ValueError(f"unknown job state {name!r}") from None


TERMINAL = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def state_name(value: int) -> str:
    """``"RUNNING"`` for ``pb.TRAIN_JOB_STATE_RUNNING`` (any proto value, UNSPECIFIED included)."""
    return str(pb.TrainJobState.Name(value).removeprefix(PROTO_STATE_PREFIX))
