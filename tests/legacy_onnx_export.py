"""The previous release's ONNX decoder exporter (torch.onnx, fp32), kept only to write old-format graphs.

Bundles converted by that release carry this graph (inputs `past_key_i`, `embeds_mask`, logits for
every position); tests/test_onnx_decoder_compat.py writes one with it and checks that today's runtime
still loads it and answers as transformers does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convert.checkpoint import Checkpoint
from convert.models.gemma3 import MedGemmaSpec


def _module(ckpt: Checkpoint, spec: MedGemmaSpec) -> Any:
    import torch
    from torch import nn

    t = spec.text
    w = {n[len("text."):]: torch.from_numpy(ckpt.get(n)) for n in ckpt.names("text")}

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # ref: transformers Gemma3RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + t.rms_norm_eps) * (1.0 + weight)

    def inv_freq(theta: float, factor: float | None) -> torch.Tensor:
        f = 1.0 / theta ** (torch.arange(0, t.head_dim, 2, dtype=torch.float32) / t.head_dim)
        return f / factor if factor else f  # ref: transformers linear RoPE scaling divides the frequencies

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v, requires_grad=False) for k, v in w.items()})
            self.register_buffer("freq_global", inv_freq(t.rope_theta, t.rope_linear_factor))
            self.register_buffer("freq_local", inv_freq(t.rope_local_theta, None))

        def g(self, name: str) -> torch.Tensor:
            return self.p[name.replace(".", "__")]

        def rope(self, x: torch.Tensor, pos: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
            ang = pos[0, :, None].float() * freq[None, :]  # [S, D/2]
            cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
            half = t.head_dim // 2
            rotated = torch.cat([-x[..., half:], x[..., :half]], -1)  # ref: transformers rotate_half
            return x * cos + rotated * sin

        def forward(self, input_ids, inputs_embeds, embeds_mask, position_ids, mask_global, mask_local, *past):  # type: ignore[no-untyped-def]
            # input_ids, embeds_mask, position_ids: [1, S]; inputs_embeds: [1, S, H]; masks: [1, 1, S, P+S]
            tok = self.g("embed_tokens.weight")[input_ids] * float(t.hidden_size ** 0.5)
            x = torch.where(embeds_mask[..., None] > 0, inputs_embeds, tok)
            s = x.shape[1]
            presents = []
            for i in range(t.num_layers):
                b = f"layers.{i}."
                swa = t.layer_types[i] == "sliding_attention"
                h = rms(x, self.g(b + "input_layernorm.weight"))
                q = (h @ self.g(b + "self_attn.q_proj.weight").T).view(1, s, t.num_heads, t.head_dim).transpose(1, 2)
                k = (h @ self.g(b + "self_attn.k_proj.weight").T).view(1, s, t.num_kv_heads, t.head_dim).transpose(1, 2)
                v = (h @ self.g(b + "self_attn.v_proj.weight").T).view(1, s, t.num_kv_heads, t.head_dim).transpose(1, 2)
                freq = self.freq_local if swa else self.freq_global
                q = self.rope(rms(q, self.g(b + "self_attn.q_norm.weight")), position_ids, freq)
                k = self.rope(rms(k, self.g(b + "self_attn.k_norm.weight")), position_ids, freq)
                k = torch.cat([past[2 * i], k], 2)
                v = torch.cat([past[2 * i + 1], v], 2)
                presents += [k, v]
                rep = t.num_heads // t.num_kv_heads
                kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
                scores = (q @ kk.transpose(2, 3)) * t.query_pre_attn_scalar ** -0.5
                attn = torch.softmax(scores + (mask_local if swa else mask_global), -1) @ vv
                o = attn.transpose(1, 2).reshape(1, s, t.num_heads * t.head_dim) @ self.g(b + "self_attn.o_proj.weight").T
                x = x + rms(o, self.g(b + "post_attention_layernorm.weight"))
                h = rms(x, self.g(b + "pre_feedforward_layernorm.weight"))
                gate = torch.nn.functional.gelu(h @ self.g(b + "mlp.gate_proj.weight").T, approximate="tanh")
                mlp = (gate * (h @ self.g(b + "mlp.up_proj.weight").T)) @ self.g(b + "mlp.down_proj.weight").T
                x = x + rms(mlp, self.g(b + "post_feedforward_layernorm.weight"))
            x = rms(x, self.g("norm.weight"))
            return (x @ self.g("embed_tokens.weight").T, *presents)  # tied LM head

    return Decoder().eval()


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
    inputs = ["input_ids", "inputs_embeds", "embeds_mask", "position_ids", "mask_global", "mask_local", *past]
    return inputs, ["logits", *[p.replace("past_", "present_") for p in past]]


def export_legacy_fp32(ckpt: Checkpoint, spec: MedGemmaSpec, out: Path) -> None:
    """What `convert --onnx-decoder fp32` wrote before the direct graph builder."""
    import torch

    t = spec.text
    module = _module(ckpt, spec)
    s, p = 3, 2  # trace with a non-empty past so Concat keeps both inputs
    past = [torch.zeros(1, t.num_kv_heads, p, t.head_dim) for _ in range(2 * t.num_layers)]
    args = (torch.zeros(1, s, dtype=torch.int64), torch.zeros(1, s, t.hidden_size), torch.zeros(1, s),
            torch.arange(p, p + s)[None], torch.zeros(1, 1, s, p + s), torch.zeros(1, 1, s, p + s), *past)
    inputs, outputs = io_names(t.num_layers)
    dyn = {"input_ids": {1: "seq"}, "inputs_embeds": {1: "seq"}, "embeds_mask": {1: "seq"}, "position_ids": {1: "seq"},
           "mask_global": {2: "seq", 3: "total"}, "mask_local": {2: "seq", 3: "total"}, "logits": {1: "seq"}}
    dyn.update({n: {2: "past"} for n in inputs[6:]})
    dyn.update({n: {2: "total"} for n in outputs[1:]})
    with torch.no_grad():
        torch.onnx.export(module, args, str(out), input_names=inputs, output_names=outputs, dynamic_axes=dyn,
                          opset_version=17, dynamo=False, do_constant_folding=True)
