"""The Gemma 3 decoder as ONNX nodes, written directly (no tracing) from the checkpoint's tensors.

Hidden states are 2-D [S, hidden] throughout (one sequence per call). Each layer: Gemma RMSNorm with
its 1 + w folded into the weight (SimplifiedLayerNormalization; after a residual add, one
SkipSimplifiedLayerNormalization does both), one fused q/k/v projection, per-head q/k norms, rotary
embedding (RotaryEmbedding) from the layer type's table, the in-place cache write (TensorScatter) and
the standard ONNX `Attention` over the whole buffer with the runtime's mask, the output projection,
post-attention norm, and the fused gate/up MLP with tanh GELU. `portable` builds the same from older
ops (ScatterElements, MatMul, Softmax, Add, rotate-half arithmetic) for execution providers without
them. The tied embedding is one block-quantized table shared by the lookup (GatherBlockQuantized) and
the LM head (MatMulNBits).
ref: transformers models/gemma3/modeling_gemma3.py (Gemma3DecoderLayer, Gemma3RMSNorm, rotate_half).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from convert.checkpoint import Checkpoint
from convert.models.gemma3 import TextSpec
from convert.writers.onnx_blockquant import BLOCK_SIZE, bf16_to_f32, packed_shape, quantize_blocks
from convert.writers.onnx_graph import FLOAT, INT64, MS_DOMAIN, Graph
from medgemma_edge.backends.onnx import decoder_io as io

log = logging.getLogger(__name__)

EMBED_CHUNK_ROWS = 8192  # rows of the 262k-row embedding quantized at once (4B: 84 MB of fp32)


ATTENTION = ("fused", "portable")  # how a layer writes its cache and attends (see DecoderGraph.attend)


@dataclass(frozen=True)
class Quant:
    bits: int | None  # None: plain fp32 weights
    accuracy_level: int = 0  # MatMulNBits: 0 = fp32 activations, 4 = int8 activations per block
    block: int = BLOCK_SIZE  # values per quantization block along K


class Weights:
    """The checkpoint's decoder tensors (canonical `text.` names) as float32, one tensor at a time."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def get(self, name: str) -> np.ndarray:
        return self.ckpt.get("text." + name)

    def rows(self, name: str, chunk: int) -> Iterator[np.ndarray]:
        """A 2-D tensor as float32 row chunks, converted from the stored bits chunk by chunk."""
        full = "text." + name
        dtype = self.ckpt.dtype(full)
        raw = self.ckpt.get_raw(full)
        for start in range(0, raw.shape[0], chunk):
            part = raw[start:start + chunk]
            if dtype == "BF16":
                yield bf16_to_f32(part)
            elif dtype == "F16":
                yield part.view(np.float16).astype(np.float32)
            else:
                yield part.astype(np.float32)


class DecoderGraph:
    def __init__(self, g: Graph, weights: Weights, t: TextSpec, quant: Quant, attention: str = "fused") -> None:
        self.g, self.w, self.t, self.q, self.portable = g, weights, t, quant, attention == "portable"
        self.slot_index: dict[str, str] = {}  # the portable cache write's index per attention type (build sets it)

    # -- building blocks ---------------------------------------------------------------------------
    def linear(self, x: str, parts: list[str], label: str) -> str:
        """x [S, K] @ W.T for W = the parts' rows stacked (fused projections); W [N, K] as stored."""
        mats = [self.w.get(p) for p in parts]
        n, k = sum(m.shape[0] for m in mats), mats[0].shape[1]
        if self.q.bits is None:
            weight = self.g.weight(label + ".weight", np.concatenate(mats) if len(mats) > 1 else mats[0])
            return self.g.op("Gemm", [x, weight], transB=1, label=label)
        quantized = [quantize_blocks(m, self.q.bits, self.q.block) for m in mats]
        del mats
        packed = self.g.weight(label + ".qweight", np.concatenate([b for b, _ in quantized]))
        scales = self.g.weight(label + ".scales", np.concatenate([s for _, s in quantized]))
        return self.g.op("MatMulNBits", [x, packed, scales], domain=MS_DOMAIN, K=k, N=n, bits=self.q.bits,
                         block_size=self.q.block, accuracy_level=self.q.accuracy_level, label=label)

    def norm_weight(self, name: str) -> str:
        # ref: Gemma3RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32
        return self.g.weight(name, (1.0 + self.w.get(name)).astype(np.float32))

    def norm(self, x: str, name: str) -> str:
        return self.g.op("SimplifiedLayerNormalization", [x, self.norm_weight(name)], axis=-1,
                         epsilon=self.t.rms_norm_eps, stash_type=1, label=name.rsplit(".", 1)[0])

    def residual(self, x: str, h: str, name: str) -> tuple[str, str]:
        """(norm `name` of x + h: the next block's input, x + h: the residual stream). Fused: one
        SkipSimplifiedLayerNormalization, which returns the sum as its fourth output."""
        if self.portable:
            total = self.g.op("Add", [x, h])
            return self.norm(total, name), total
        label = name.rsplit(".", 1)[0]
        normed, total = self.g.name(label), self.g.name(label + "_sum")
        self.g.op("SkipSimplifiedLayerNormalization", [h, x, self.norm_weight(name)],
                  outputs=[normed, "", "", total], domain=MS_DOMAIN, epsilon=self.t.rms_norm_eps, label=label)
        return normed, total

    def rope_tables(self, positions: str, theta: float, factor: float | None, label: str) -> tuple[str, str]:
        """cos, sin [1, S, head_dim/2] for one RoPE table (global or local)."""
        d = self.t.head_dim
        # ref: transformers _compute_default_rope_parameters; linear scaling divides the frequencies
        inv_freq = (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float32) / d)).astype(np.float32)
        if factor:
            inv_freq = (inv_freq / np.float32(factor)).astype(np.float32)
        angles = self.g.op("Mul", [positions, self.g.const(inv_freq, np.float32)], label=label)
        return self.g.op("Cos", [angles]), self.g.op("Sin", [angles])

    def rope(self, x: str, cos: str, sin: str) -> str:
        """x [1, heads, S, head_dim], cos/sin [1, S, head_dim/2]; ref: transformers rotate_half (halves, not
        interleaved pairs), which is RotaryEmbedding's default (interleaved=0)."""
        if not self.portable:
            return self.g.op("RotaryEmbedding", [x, cos, sin], label="rope")
        half = self.t.head_dim // 2
        x1, x2 = self.g.op("Split", [x, self.g.const([half, half])], axis=-1, n_out=2)
        first = self.g.op("Sub", [self.g.op("Mul", [x1, cos]), self.g.op("Mul", [x2, sin])])
        second = self.g.op("Add", [self.g.op("Mul", [x2, cos]), self.g.op("Mul", [x1, sin])])
        return self.g.op("Concat", [first, second], axis=-1)

    # -- the model ---------------------------------------------------------------------------------
    def embed_table(self) -> tuple[str, str | None]:
        """The tied embedding [vocab, hidden]: (fp32 table, None) or (packed codes, scales)."""
        t, name = self.t, "embed_tokens.weight"
        if self.q.bits is None:
            chunks = self.w.rows(name, EMBED_CHUNK_ROWS)
            return self.g.data.add_chunks(name, np.dtype(np.float32), (t.vocab_size, t.hidden_size), chunks), None
        scales: list[np.ndarray] = []

        def packed() -> Iterator[np.ndarray]:
            for rows in self.w.rows(name, EMBED_CHUNK_ROWS):
                codes, s = quantize_blocks(rows, self.q.bits or 0, self.q.block)
                scales.append(s)
                yield codes

        shape = packed_shape(t.vocab_size, t.hidden_size, self.q.bits, self.q.block)
        codes = self.g.data.add_chunks(name + ".qweight", np.dtype(np.uint8), shape, packed())
        return codes, self.g.weight(name + ".scales", np.concatenate(scales))

    def lookup(self, ids: str, table: str, scales: str | None) -> str:
        """Token ids [St] -> embeddings [St, hidden], scaled by sqrt(hidden) as Gemma3TextScaledWordEmbedding."""
        if scales is None:
            rows = self.g.op("Gather", [table, ids], axis=0)
        else:
            bits = self.q.bits or 0
            flat = self.g.data.alias(table + ".rows", table, (self.t.vocab_size, self.t.hidden_size * bits // 8))
            if self.portable:
                rows = self.dequantized_rows(flat, ids, scales, bits)
            else:
                rows = self.g.op("GatherBlockQuantized", [flat, ids, scales], domain=MS_DOMAIN, bits=bits,
                                 block_size=self.q.block, gather_axis=0, quantize_axis=1, label="embed")
        scale = np.float32(math.sqrt(self.t.hidden_size))
        return self.g.op("Mul", [rows, self.g.const(scale, np.float32)], label="embed_scale")

    def dequantized_rows(self, codes: str, ids: str, scales: str, bits: int) -> str:
        """GatherBlockQuantized's lookup from Gather and arithmetic, for the portable graph (DirectML has no
        GatherBlockQuantized): only the rows looked up are dequantized, (code - 2^(bits-1)) x their block's
        scale, as onnx_blockquant.dequantize_blocks. No -1 in the shapes: a call of image embeddings looks up
        no rows, and -1 cannot be inferred for an empty tensor."""
        g, h, block = self.g, self.t.hidden_size, self.q.block
        width = h * bits // 8
        c = g.op("Cast", [g.op("Gather", [codes, ids], axis=0)], to=FLOAT)  # [S, width]
        if bits == 4:  # two codes a byte, the first in the low nibble; split in float (no BitShift before 18 in ONNX)
            sixteen = g.const(np.float32(16), np.float32)
            high = g.op("Floor", [g.op("Div", [c, sixteen])])
            low = g.op("Sub", [c, g.op("Mul", [high, sixteen])])
            pairs = [g.op("Reshape", [x, g.const([0, width, 1])]) for x in (low, high)]
            c = g.op("Reshape", [g.op("Concat", pairs, axis=-1), g.const([0, h])])
        centred = g.op("Sub", [c, g.const(np.float32(1 << (bits - 1)), np.float32)])
        block_scales = g.op("Unsqueeze", [g.op("Gather", [scales, ids], axis=0), g.const([-1])])  # [S, h/block, 1]
        w = g.op("Mul", [g.op("Reshape", [centred, g.const([0, h // block, block])]), block_scales])
        return g.op("Reshape", [w, g.const([0, h])], label="embed")

    def lm_head(self, x: str, table: str, scales: str | None, out: str) -> None:
        t, softcap = self.t, self.t.final_logit_softcapping
        head = None if softcap else [out]
        if scales is None:
            logits = self.g.op("Gemm", [x, table], transB=1, outputs=head, label="lm_head")
        else:
            logits = self.g.op("MatMulNBits", [x, table, scales], domain=MS_DOMAIN, K=t.hidden_size,
                               N=t.vocab_size, bits=self.q.bits, block_size=self.q.block,
                               accuracy_level=self.q.accuracy_level, outputs=head, label="lm_head")
        if softcap:  # ref: Gemma3ForCausalLM: cap * tanh(logits / cap)
            cap = self.g.const(np.float32(softcap), np.float32)
            self.g.op("Mul", [self.g.op("Tanh", [self.g.op("Div", [logits, cap])]), cap], outputs=[out])

    def attention(self, h: str, i: int, tables: dict[str, tuple[str, str]], masks: dict[str, str],
                  write: str) -> str:
        t, g = self.t, self.g
        b = f"layers.{i}.self_attn."
        nh, kv, d = t.num_heads, t.num_kv_heads, t.head_dim
        qkv = self.linear(h, [b + "q_proj.weight", b + "k_proj.weight", b + "v_proj.weight"], b + "qkv")
        q, k, v = g.op("Split", [qkv, g.const([nh * d, kv * d, kv * d])], axis=-1, n_out=3)
        cos, sin = tables[t.layer_types[i]]

        def heads(x: str, n: str | int, norm: str | None) -> str:  # [S, n*d] -> [1, n, S, d]
            x = g.op("Reshape", [x, g.const([1, -1, n, d])])
            if norm is None:
                return g.op("Transpose", [x], perm=[0, 2, 1, 3])
            return self.rope(g.op("Transpose", [self.norm(x, norm)], perm=[0, 2, 1, 3]), cos, sin)

        q = heads(q, nh, b + "q_norm.weight")
        k = heads(k, kv, b + "k_norm.weight")
        v = heads(v, kv, None)
        caches = []
        for kind, new in (("key", k), ("value", v)):
            past = g.input(io.cache_input(i, kind), FLOAT, [1, kv, f"capacity_{i}", d])
            present = g.output(io.cache_output(i, kind), FLOAT, [1, kv, f"capacity_{i}", d])
            caches.append(self.write_cache(past, new, write, present, t.layer_types[i]))
        y = self.attend(q, caches[0], caches[1], masks[t.layer_types[i]], f"layers.{i}.attention")
        y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.const([-1, nh * d])])
        return self.linear(y, [b + "o_proj.weight"], b + "o_proj")

    def write_cache(self, past: str, new: str, write: str, present: str, kind: str) -> str:
        """past [1, kv, C, d] with `new` [1, kv, S, d] at slots (write + 0..S-1) mod C, as `present`.

        On ONNX Runtime's CPU provider the runtime binds `past` and `present` to one buffer, and both ops below
        write in place; elsewhere it binds two (medgemma_edge/backends/onnx/decoder.py).
        """
        if not self.portable:
            return self.g.op("TensorScatter", [past, new, write], outputs=[present], axis=2, mode="circular")
        return self.g.op("ScatterElements", [past, self.slot_index[kind], new], outputs=[present], axis=2)

    def slot_indices(self, positions: str, write: str) -> dict[str, str]:
        """The portable cache write's index [1, kv, S, d] per attention type, built once: every layer of a type
        has the same capacity (the first layer's key buffer gives it)."""
        t, g = self.t, self.g
        n = g.op("Gather", [g.op("Shape", [positions]), g.const(1)], axis=0)
        offsets = g.op("Add", [g.op("Range", [g.const(0), n, g.const(1)]), g.op("Reshape", [write, g.const([])])])
        out = {}
        for kind in sorted(set(t.layer_types)):
            past = io.cache_input(t.layer_types.index(kind), "key")
            capacity = g.op("Gather", [g.op("Shape", [past]), g.const(2)], axis=0)
            # Mod in float (exact below 2**24 positions): DirectML's Mod takes no int64
            slots = g.op("Cast", [g.op("Mod", [g.op("Cast", [offsets], to=FLOAT), g.op("Cast", [capacity], to=FLOAT)],
                                        fmod=1)], to=INT64)
            # Expand broadcasts [1, 1, S, 1] against [1, kv, 1, d]
            out[kind] = g.op("Expand", [g.op("Reshape", [slots, g.const([1, 1, -1, 1])]),
                                        g.const([1, t.num_kv_heads, 1, t.head_dim])])
        return out

    def attend(self, q: str, k: str, v: str, mask: str, label: str) -> str:
        """Attention of q [1, heads, S, d] over the cache k, v [1, kv, C, d] with the additive mask [1, 1, S, C].

        fused: the ONNX Attention op (opset 23), ONNX Runtime's CPU kernel. portable: the same arithmetic from
        MatMul and Softmax, which every execution provider implements; each kv head serves its group of
        query heads by broadcasting (ref: transformers repeat_kv: query head h reads kv head h // group),
        so K and V are never repeated.
        """
        t, g = self.t, self.g
        nh, kv, d = t.num_heads, t.num_kv_heads, t.head_dim
        scale = float(t.query_pre_attn_scalar) ** -0.5
        if not self.portable:
            return g.op("Attention", [q, k, v, mask], q_num_heads=nh, kv_num_heads=kv, scale=scale, label=label)
        group = g.op("Reshape", [g.op("Mul", [q, g.const(np.float32(scale), np.float32)]),
                                 g.const([kv, nh // kv, -1, d])])  # [kv, group, S, d]
        k4 = g.op("Transpose", [g.op("Reshape", [k, g.const([kv, 1, -1, d])])], perm=[0, 1, 3, 2])  # [kv, 1, d, C]
        scores = g.op("Add", [g.op("MatMul", [group, k4]), mask], label=label + "_scores")  # [kv, group, S, C]
        probs = g.op("Softmax", [scores], axis=-1)
        y = g.op("MatMul", [probs, g.op("Reshape", [v, g.const([kv, 1, -1, d])])])  # [kv, group, S, d]
        return g.op("Reshape", [y, g.const([1, nh, -1, d])], label=label)

    def mlp(self, h: str, i: int) -> str:
        b, ff = f"layers.{i}.mlp.", self.t.intermediate_size
        gate_up = self.linear(h, [b + "gate_proj.weight", b + "up_proj.weight"], b + "gate_up")
        gate, up = self.g.op("Split", [gate_up, self.g.const([ff, ff])], axis=-1, n_out=2)
        act = self.gelu_tanh(gate)
        return self.linear(self.g.op("Mul", [act, up]), [b + "down_proj.weight"], b + "down_proj")

    def gelu_tanh(self, x: str) -> str:
        """ref: transformers gelu_pytorch_tanh. Gelu (opset 20) where it may; the portable graph (opset 17, and
        DirectML has no Gelu) spells it out: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
        g = self.g
        if not self.portable:
            return g.op("Gelu", [x], approximate="tanh")
        cube = g.op("Mul", [g.op("Mul", [x, x]), x])
        inner = g.op("Add", [x, g.op("Mul", [cube, g.const(np.float32(0.044715), np.float32)])])
        t = g.op("Tanh", [g.op("Mul", [inner, g.const(np.float32(math.sqrt(2 / math.pi)), np.float32)])])
        half = g.op("Mul", [x, g.const(np.float32(0.5), np.float32)])
        return g.op("Mul", [half, g.op("Add", [t, g.const(np.float32(1.0), np.float32)])])

    def build(self) -> None:
        t, g = self.t, self.g
        ids = g.input(io.INPUT_IDS, INT64, [1, "tokens"])
        embeds = g.input(io.INPUTS_EMBEDS, FLOAT, [1, "embeddings", t.hidden_size])
        positions = g.input(io.POSITION_IDS, INT64, [1, "positions"])
        logits_index = g.input(io.LOGITS_INDEX, INT64, ["logit_positions"])
        write = g.input(io.WRITE_INDEX, INT64, [1])
        kinds = sorted(set(t.layer_types))
        masks = {k: g.input(io.MASKS[k], FLOAT, [1, 1, "positions", f"capacity_{k}"]) for k in kinds}

        self.slot_index = self.slot_indices(positions, write) if self.portable else {}
        pos = g.op("Reshape", [g.op("Cast", [positions], to=FLOAT), g.const([1, -1, 1])])
        rope = {"full_attention": (t.rope_theta, t.rope_linear_factor),
                "sliding_attention": (t.rope_local_theta, None)}  # ref: HF scales only the global table
        tables = {k: self.rope_tables(pos, *rope[k], label=f"rope_{k}") for k in kinds}

        table, scales = self.embed_table()
        tokens = self.lookup(g.op("Reshape", [ids, g.const([-1])]), table, scales)
        x = g.op("Concat", [g.op("Reshape", [embeds, g.const([-1, t.hidden_size])]), tokens], axis=0)
        normed = self.norm(x, "layers.0.input_layernorm.weight")
        for i in range(t.num_layers):
            b = f"layers.{i}."
            h = self.attention(normed, i, tables, masks, write)
            normed, x = self.residual(x, self.norm(h, b + "post_attention_layernorm.weight"),
                                      b + "pre_feedforward_layernorm.weight")
            h = self.norm(self.mlp(normed, i), b + "post_feedforward_layernorm.weight")
            if i + 1 < t.num_layers:
                normed, x = self.residual(x, h, f"layers.{i + 1}.input_layernorm.weight")
            else:  # the final norm reads only the logit positions, gathered first
                x = g.op("Add", [x, h])
            log.debug("layer %d written (%.0f MiB so far)", i, g.data.offset / 2**20)
        last = self.norm(g.op("Gather", [x, logits_index], axis=0), "norm.weight")
        self.lm_head(last, table, scales, g.output(io.LOGITS, FLOAT, ["logit_positions", t.vocab_size]))
