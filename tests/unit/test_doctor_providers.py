"""`doctor` names the ONNX Runtime package that gives a workstation's GPU a provider (fingerprints as dicts)."""

from __future__ import annotations

from typing import Any

import pytest

from medgemma_edge.measure.doctor import advice, onnxruntime_provider_advice

pytestmark = pytest.mark.unit


def _fp(os_name: str, vendor: str | None, providers: list[str]) -> dict[str, Any]:
    return {"os": os_name, "cpu": {"flags": []}, "gpus": [{"name": f"{vendor} GPU", "vendor": vendor}] if vendor else [],
            "llama_cpp": {"error": None, "gpu_offload": True, "system_info": "CPU", "lib_path_env": {}},
            "onnxruntime": {"providers": providers}}


@pytest.mark.parametrize(("os_name", "vendor", "providers", "expect"), [
    ("Windows-11-10.0.22631-SP0", "AMD", ["CPUExecutionProvider"], "onnxruntime-directml"),
    ("Windows-11-10.0.22631-SP0", "Intel", ["CPUExecutionProvider"], "onnxruntime-directml"),
    ("Linux-6.8.0-x86_64-with-glibc2.39", "Intel", ["CPUExecutionProvider"], "medgemma-edge[openvino-ep]"),
    ("Windows-11-10.0.22631-SP0", "AMD", ["DmlExecutionProvider", "CPUExecutionProvider"], None),
    ("Linux-6.8.0-x86_64-with-glibc2.39", "Intel", ["OpenVINOExecutionProvider", "CPUExecutionProvider"], None),
    ("Linux-6.8.0-x86_64-with-glibc2.39", None, ["CPUExecutionProvider"], None),
    ("macOS-15.1-arm64-arm-64bit", "Apple", ["CoreMLExecutionProvider", "CPUExecutionProvider"], None),
])
def test_provider_package_advice(os_name: str, vendor: str | None, providers: list[str], expect: str | None) -> None:
    tips = onnxruntime_provider_advice(_fp(os_name, vendor, providers))
    if expect is None:
        assert tips == []
    else:
        assert len(tips) == 1 and expect in tips[0]
        assert tips[0] in advice(_fp(os_name, vendor, providers))  # doctor prints it


def test_swaps_are_spelled_out() -> None:
    tip = onnxruntime_provider_advice(_fp("Windows-10", "AMD", ["CPUExecutionProvider"]))[0]
    assert "pip uninstall -y onnxruntime && pip install onnxruntime-directml" in tip and "--providers dml" in tip
    intel = onnxruntime_provider_advice(_fp("Linux-6.8.0", "Intel", ["CPUExecutionProvider"]))[0]
    assert "no swap" in intel and "--onnx-attention portable" in intel and "--providers openvino:gpu,cpu" in intel
    # the plugin installed (it lists no provider until a session registers it): only the conversion and the flag
    installed = {**_fp("Linux-6.8.0", "Intel", ["CPUExecutionProvider"]),
                 "versions": {"onnxruntime_ep_openvino": "1.8.1"}}
    tip = onnxruntime_provider_advice(installed)[0]
    assert "pip install" not in tip and "--onnx-attention portable" in tip
