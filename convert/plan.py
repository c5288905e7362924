"""What a conversion needs before it starts: disk for every artifact (and the scratch files beside them) and
RAM for its largest step, estimated from the spec's shapes, so a conversion that cannot finish is refused
with both figures instead of being killed halfway (or filling the disk).

Estimates err high: a memory refusal that was not needed costs a retry with `--force`; a full disk costs an hour.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgemma_edge.errors import UserError

GiB = float(1 << 30)
# bytes per weight of each precision as written (k-quants mix 4- and 6-bit blocks; q4_k_m ~4.9 bits)
_GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_k_m": 0.62}
_MMPROJ_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32 + 0.3}  # the 4304-wide FFN stays F16 in Q8_0
_VISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.1, "int8_static": 1.1}
_DECODER_BYTES = {"fp32": 4.0, "int8": 1.1, "int4": 0.6, "int4_b128": 0.55}


def text_params(t: Any) -> tuple[int, int]:
    """(all decoder weights, the largest single tensor: the tied embedding) of a text spec."""
    per_layer = (t.hidden_size * t.num_heads * t.head_dim * 2 + t.hidden_size * t.num_kv_heads * t.head_dim * 2
                 + 3 * t.hidden_size * t.intermediate_size)
    embed = t.vocab_size * t.hidden_size
    return embed + t.num_layers * per_layer, embed


def vision_params(spec: Any) -> int:
    v = getattr(spec, "vision", None)
    if v is None:
        return 0
    per_layer = 4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size
    return (v.num_layers * per_layer + v.patches_per_side ** 2 * v.hidden_size + 3 * v.patch_size ** 2 * v.hidden_size
            + v.hidden_size * spec.text.hidden_size)


@dataclass
class Needs:
    disk: float = 0.0  # bytes of the artifacts written
    scratch: float = 0.0  # the largest scratch file(s) that exist beside them at some point
    ram: float = 0.0  # bytes of the largest step
    parts: dict[str, float] = field(default_factory=dict)  # artifact -> bytes on disk

    def add(self, name: str, disk: float, ram: float, scratch: float = 0.0) -> None:
        self.parts[name] = disk
        self.disk += disk
        self.ram = max(self.ram, ram)
        self.scratch = max(self.scratch, scratch)

    @property
    def peak_disk(self) -> float:
        return self.disk + self.scratch


def estimate(spec: Any, plan: dict[str, list[str]], onnx_decoder: Any = None) -> Needs:
    """Disk and RAM for `plan` ({"gguf": [...], "mmproj": [...], "onnx_vision": [...], "onnx_decoder": [...]}).

    `onnx_decoder`: the ONNX decoder writer module, whose own estimate_disk/estimate_ram are used when it has them.
    """
    n_text, n_embed = text_params(spec.text)
    n_vision = vision_params(spec)
    needs = Needs()
    if plan.get("gguf"):
        base = "f32" if "f32" in plan["gguf"] else "bf16"
        # the base is written tensor by tensor (one bf16 copy of the embedding in RAM); llama.cpp's quantizer
        # then holds one tensor in f32 beside its quantized copy
        ram = n_embed * (4 + 2) + (1 << 30)
        if base not in plan["gguf"]:
            needs.add(f".decoder-{base}.base.gguf", 0.0, ram, scratch=n_text * _GGUF_BYTES[base])
        for p in plan["gguf"]:
            needs.add(f"decoder-{p}.gguf", n_text * _GGUF_BYTES[p], ram)
    for p in plan.get("mmproj", []):
        needs.add(f"mmproj-{p}.gguf", n_vision * _MMPROJ_BYTES[p], n_vision * 4 + (1 << 30))
    if plan.get("onnx_vision"):
        # torch module and its fp32 export, fused copy and one quantized intermediate beside the outputs
        for p in plan["onnx_vision"]:
            # measured at 4B: int8_static's calibration peaks at 12.2 GB (~29 bytes per vision weight)
            ram = n_vision * (4 * 7 if p == "int8_static" else 4 * 4) + (2 << 30)
            needs.add(f"vision-{p}.onnx", n_vision * _VISION_BYTES[p], ram, scratch=n_vision * 4 * 3)
    for p in plan.get("ov_vision", []):
        # the torch module, OpenVINO's converted copy and the compiled check (NNCF adds its statistics);
        # weights on disk in fp16 (int8: one byte each)
        needs.add(f"vision-ov-{p}.xml", n_vision * (1.1 if p == "int8" else 2.0), n_vision * 4 * 4 + (2 << 30))
    for p in plan.get("onnx_decoder", []):
        if onnx_decoder is not None and hasattr(onnx_decoder, "estimate_disk"):
            disk, ram = onnx_decoder.estimate_disk(spec, p), onnx_decoder.estimate_ram(spec, p)
            scratch = 0.0
        else:  # the traced export: the whole text model in fp32, then a quantized copy
            disk, ram, scratch = n_text * _DECODER_BYTES[p], n_text * 4 * 4.5, n_text * 4.0
        needs.add(f"decoder-{p}.onnx", disk, ram, scratch=scratch)
    return needs


def preflight(needs: Needs, out: Path, available_ram: float | None, force: bool = False) -> None:
    """Refuse, with both figures, a conversion the disk at `out` or this machine's memory cannot hold
    (`force` skips the memory check only: a full disk is never worth trying)."""
    probe = out
    while not probe.exists():  # the output folder may not exist yet: its nearest existing parent's filesystem
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    problems = []
    if needs.peak_disk > free:
        problems.append(f"about {needs.peak_disk / GiB:.1f} GiB of disk at {probe} (artifacts and scratch files), "
                        f"{free / GiB:.1f} GiB free")
    if available_ram is not None and needs.ram > available_ram and not force:
        problems.append(f"about {needs.ram / GiB:.1f} GiB of RAM for its largest step, "
                        f"{available_ram / GiB:.1f} GiB available")
    if problems:
        raise UserError(f"{out}: this conversion needs " + " and ".join(problems) +
                        "; free some, convert fewer precisions at a time, or choose another -o"
                        + (" (--force skips the memory check)" if len(problems) == 1 and "RAM" in problems[0] else ""))


def describe(needs: Needs) -> str:
    top = sorted(needs.parts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / GiB:.2f}" for k, v in top if v) + f" GiB; RAM peak ~{needs.ram / GiB:.1f} GiB"
