"""Bundles written by the previous release keep loading and answering the same, and the bf16 base GGUF
that quantization now starts from changes no byte of what llama.cpp's quantizer writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import linked_copy

import medgemma_edge
from medgemma_edge.bundle import MANIFEST, open_bundle
from medgemma_edge.extras import convert_checkpoint

PROMPT, SYSTEM = "Describe this X-ray", "You are an expert radiologist."


def test_a_manifest_without_this_releases_fields_loads_and_answers_the_same(tiny_bundle: Path, xray_png: Path,
                                                                            tmp_path: Path) -> None:
    old = linked_copy(tiny_bundle, tmp_path / "old")
    manifest = json.loads((old / MANIFEST).read_text())
    for key in ("image_mean", "image_std"):  # what the previous release did not write
        del manifest["config"]["vision"][key]
    (old / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for encoder, decoder in (("onnx:int8", "gguf:q4_k_m"), ("gguf:f16", "onnx:fp32")):
        with medgemma_edge.load(old, encoder=encoder, decoder=decoder) as a, \
                medgemma_edge.load(tiny_bundle, encoder=encoder, decoder=decoder, verify=False) as b:
            ids_a, logits_a = a.prompt_logits(PROMPT, [xray_png], SYSTEM)
            ids_b, logits_b = b.prompt_logits(PROMPT, [xray_png], SYSTEM)
        assert ids_a.tolist() == ids_b.tolist()
        np.testing.assert_array_equal(logits_a, logits_b)


def test_quantizing_from_the_bf16_base_gives_the_same_bytes_as_from_f32(tiny_ckpt: Path, tiny_bundle: Path,
                                                                         tmp_path: Path) -> None:
    # the session bundle has f32 among its precisions, so its q4_k_m was quantized from the f32 base
    session = open_bundle(tiny_bundle).find("decoder", "gguf:q4_k_m")
    assert session.recipe["from"] == "f32"
    fresh = convert_checkpoint(tiny_ckpt, tmp_path / "b", ["q4_k_m"], [], progress=False).find("decoder", "gguf:q4_k_m")
    assert fresh.recipe["from"] == "bf16"  # the synthetic checkpoint, like every published MedGemma, is bf16
    assert fresh.sha256 == session.sha256
    assert not list((tmp_path / "b").glob(".*base*"))  # the scratch base is gone
