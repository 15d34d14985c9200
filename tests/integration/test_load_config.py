"""RepositoryModelLoad with a ``config`` parameter, through tritonclient, on a real worker and gateway.

The override replaces config.json until a plain load; a bad one fails with "failed to load" and
the config in force keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.integration.test_gateway import start_gateway, start_workers, wait_until
from tests.support.deps import require_module
from tests.support.models import export_mlp, publish

tc = require_module("tritonclient.grpc")
utils = require_module("tritonclient.utils")


@pytest.fixture
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("store")
    publish(root, "mlp", 1, export_mlp(tmp_path_factory.mktemp("onnx") / "mlp.onnx"), {"max_batch_size": 8})
    procs = start_workers(root, 1)
    try:
        procs.append(start_gateway(procs[:1]))
        yield {"worker": procs[0].address, "gateway": procs[1].address}
    finally:
        for p in reversed(procs):
            p.stop()


def _infer(client: Any, rows: int) -> str:
    x = tc.InferInput("input", [rows, 8], "FP32")
    x.set_data_from_numpy(np.ones((rows, 8), np.float32))
    try:
        client.infer("mlp", [x])
    except utils.InferenceServerException as err:
        return str(err.message())
    return "OK"


def _refused(client: Any, config: str) -> str:
    with pytest.raises(utils.InferenceServerException) as err:
        client.load_model("mlp", config=config)
    return str(err.value.message())


@pytest.mark.parametrize("hop", ["worker", "gateway"])
def test_load_with_a_config_override_then_back_to_the_file(servers: dict[str, Any], hop: str) -> None:
    client = tc.InferenceServerClient(servers[hop])
    wait_until(lambda: client.is_model_ready("mlp"), 30, "mlp ready")
    assert client.get_model_config("mlp").config.max_batch_size == 8
    assert "exceeds the model's max_batch_size 8" in _infer(client, 12)

    client.load_model("mlp", config='{"max_batch_size": 16}')
    wait_until(lambda: client.get_model_config("mlp").config.max_batch_size == 16, 30, "override seen")
    assert _infer(client, 12) == "OK"

    bad = {
        '{"max_batch_size": -1}': "max_batch_size must be >= 0",
        '{"input": [{"name": "input", "data_type": "TYPE_INT32", "dims": [8]}]}': (
            "the config gives 'input' datatype INT32 but the graph's is FP32"
        ),
        "{not json": "the 'config' parameter is not valid JSON",
        "[1, 2]": "must be a JSON object",
    }
    for config, reason in bad.items():
        message = _refused(client, config)
        assert "failed to load" in message and reason in message, message
        assert client.get_model_config("mlp").config.max_batch_size == 16  # the override in force stays
        assert _infer(client, 12) == "OK"

    client.load_model("mlp")  # a plain load goes back to config.json
    wait_until(lambda: client.get_model_config("mlp").config.max_batch_size == 8, 30, "file config back")
    assert "exceeds the model's max_batch_size 8" in _infer(client, 12)
