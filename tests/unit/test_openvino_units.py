"""The OpenVINO encoder's small parts: the precision table rows, compile properties, the converter's refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medgemma_edge.backends.openvino.vision import (HINTS, compile_config, import_openvino, require_openvino,
                                                    weights_path)
from medgemma_edge.bundle.precisions import DEFAULT_ORDER, FLAGS, PRECISIONS, check_names, names
from medgemma_edge.errors import UserError

pytestmark = pytest.mark.unit


def test_the_table_has_the_issue_floors() -> None:
    assert names("encoder", "ov") == ("bf16", "int8")
    assert PRECISIONS["encoder"]["ov:bf16"].min_cosine == 0.9999
    assert PRECISIONS["encoder"]["ov:int8"].min_cosine == 0.999
    assert FLAGS["encoder", "ov"] == "--ov-vision" and {"ov:bf16", "ov:int8"} <= set(DEFAULT_ORDER["encoder"])
    with pytest.raises(UserError, match=r"--ov-vision 'int4' is not supported; choose from bf16, int8"):
        check_names(["int4"], "encoder", "ov")


def test_writer_knows_exactly_the_table_precisions() -> None:
    from convert.writers.ov_vision import METHODS

    assert sorted(METHODS) == sorted(names("encoder", "ov"))
    assert all(hint in HINTS for _, hint in METHODS.values())


def test_compile_config() -> None:
    assert compile_config("bf16", 2) == {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                                         "INFERENCE_PRECISION_HINT": "bf16", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 128,
                                         "INFERENCE_NUM_THREADS": 2}
    assert "INFERENCE_NUM_THREADS" not in compile_config("f32", None)  # OpenVINO's default: every core
    with pytest.raises(UserError, match="'fp8' is not one of f32, bf16"):
        compile_config("fp8", 2)


def test_weights_sit_beside_the_graph_under_its_name() -> None:
    # a bundle counts `<file>.*` as the artifact's extra files: the weights must match that pattern
    assert weights_path(Path("/b/vision-ov-bf16.xml")) == Path("/b/vision-ov-bf16.xml.bin")


def test_missing_openvino_is_one_line_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # what the import system does for a missing package
    for check in (import_openvino, require_openvino):
        with pytest.raises(UserError) as err:
            check("bundle/x: encoder ov:bf16")
        msg = str(err.value)
        assert "\n" not in msg and "pip install 'medgemma-edge[openvino]'" in msg and "ov:bf16" in msg


def test_converter_refuses_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from convert.writers.ov_vision import check_request

    with pytest.raises(UserError, match="not supported; choose from bf16, int8"):
        check_request("fp16")
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(UserError, match=r"NNCF is not installed; pip install 'medgemma-edge\[openvino\]'"):
        check_request("int8")
    check_request("bf16")  # needs no NNCF
