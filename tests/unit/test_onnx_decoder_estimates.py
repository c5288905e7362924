"""The ONNX decoder writer's disk and RAM estimates for MedGemma 4B's shapes, against what its export
measured on this project's machine (docs/onnx-decoder.md): never below, and not far above."""

from __future__ import annotations

import pytest

from convert.registry import spec_from_config
from convert.synth.checkpoint import build_config, synth_params
from convert.writers.onnx_decoder import estimate_disk, estimate_ram

pytestmark = pytest.mark.unit

# measured: `convert --onnx-decoder int4,int8` on the synthetic 4B (graph + data bytes; /usr/bin/time -v peak)
MEASURED_BYTES = {"int4": 2_426_728_145, "int8": 4_366_659_360}
MEASURED_PEAK_RSS = {"int4": 1_962_272 << 10, "int8": 1_921_196 << 10}
RAM_TARGET = 6 << 30  # issue 13: the 4B int4 export within 6 GB


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_4b_estimates_cover_the_measured_export(precision: str) -> None:
    spec = spec_from_config(build_config(synth_params("4b")), "4b")
    disk = estimate_disk(spec, precision)
    assert MEASURED_BYTES[precision] <= disk <= 1.05 * MEASURED_BYTES[precision]
    ram = estimate_ram(spec, precision)
    assert MEASURED_PEAK_RSS[precision] <= ram <= RAM_TARGET


def test_fp32_is_the_largest() -> None:
    spec = spec_from_config(build_config(synth_params("4b")), "4b")
    assert estimate_disk(spec, "fp32") > estimate_disk(spec, "int8") > estimate_disk(spec, "int4")
    assert estimate_disk(spec, "fp32") > 15e9  # 3.9 G parameters of 4 bytes
