"""A bundle whose ONNX decoder is the previous release's graph (inputs `past_key_i`, `embeds_mask`; logits
at every position) keeps loading and answering as transformers does, next to today's graph."""

from __future__ import annotations

import json
import os
from pathlib import Path

import medgemma_edge
from convert.checkpoint import Checkpoint
from convert.fidelity.metrics import parity
from convert.registry import load_spec
from helpers import linked_copy
from legacy_onnx_export import export_legacy_fp32
from medgemma_edge import ChatSession, SamplingParams
from medgemma_edge.bundle import MANIFEST
from medgemma_edge.fsutil import sha256_file

PROMPT, SYSTEM = "Describe this X-ray", "You are an expert radiologist."


def _old_bundle(tiny_ckpt: Path, tiny_bundle: Path, tmp_path: Path) -> Path:
    old = linked_copy(tiny_bundle, tmp_path / "old")
    graph = tmp_path / "legacy-decoder-fp32.onnx"
    export_legacy_fp32(Checkpoint(tiny_ckpt), load_spec(tiny_ckpt), graph)
    os.replace(graph, old / "decoder-fp32.onnx")  # replaces the hard link, never writes through it
    (old / "decoder-fp32.onnx.data").unlink()
    manifest = json.loads((old / MANIFEST).read_text())
    entry = next(a for a in manifest["artifacts"] if a["kind"] == "decoder" and a["format"] == "onnx"
                 and a["precision"] == "fp32")
    entry.update(size=(old / entry["file"]).stat().st_size, sha256=sha256_file(old / entry["file"]), extra_files=[],
                 recipe={"writer": "medgemma-edge onnx_decoder (torch.onnx TorchScript exporter)", "opset": 17})
    (old / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return old


def test_a_previous_release_onnx_decoder_loads_and_answers_the_same(tiny_ckpt: Path, tiny_bundle: Path,
                                                                    reference, xray_png: Path, tmp_path: Path) -> None:
    old = _old_bundle(tiny_ckpt, tiny_bundle, tmp_path)
    _, ref_logits = reference.prompt_logits(PROMPT, [xray_png], SYSTEM)
    sampling = SamplingParams(max_new_tokens=8)
    with medgemma_edge.load(old, encoder="onnx:fp32", decoder="onnx:fp32") as a, \
            medgemma_edge.load(tiny_bundle, encoder="onnx:fp32", decoder="onnx:fp32", verify=False) as b:
        assert a.decoder.legacy and not b.decoder.legacy
        ids_a, logits_a = a.prompt_logits(PROMPT, [xray_png], SYSTEM)
        ids_b, logits_b = b.prompt_logits(PROMPT, [xray_png], SYSTEM)
        assert ids_a.tolist() == ids_b.tolist()
        for logits in (logits_a, logits_b):
            m = parity(ref_logits, logits)
            assert m["mean_kl"] < 1e-4 and m["top1"] == 1.0, m
        answers = []
        for pipe in (a, b):  # a follow-up rolls the prompt cache back to the shared prefix
            session = ChatSession(pipe, system=SYSTEM)
            first = session.ask(PROMPT, images=[xray_png], sampling=sampling)
            answers.append((first.token_ids, session.ask("Is there an effusion?", sampling=sampling).token_ids))
        assert answers[0] == answers[1]
