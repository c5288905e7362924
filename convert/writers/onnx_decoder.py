"""Gemma 3 decoder -> one ONNX graph with a static, in-place KV cache, streamed tensor by tensor.

No tracing and no fp32 copy of the model: every initializer is read from the checkpoint, quantized
(blocks of 32, or 128 for int4_b128; symmetric, packed here; convert/writers/onnx_blockquant.py) and
appended to the external data file before the next one is read, so the 4B int4 export needs about
the memory of its largest tensor, not of the model. The graph (convert/writers/onnx_decoder_graph.py)
keeps image spans bidirectional: the standard ONNX `Attention` op takes the runtime's additive masks, where
onnxruntime-genai's GroupQueryAttention is causal only. The I/O contract is
medgemma_edge/backends/onnx/decoder_io.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from convert.checkpoint import Checkpoint
from convert.models.gemma3 import MedGemmaSpec, TextSpec
from convert.writers.onnx_blockquant import BLOCK_SIZE, quantized_bytes
from convert.writers.onnx_decoder_graph import ATTENTION, EMBED_CHUNK_ROWS, DecoderGraph, Quant, Weights
from convert.writers.onnx_external import ALIGN, ExternalData
from convert.writers.onnx_graph import OPSET, PORTABLE_OPSET, Graph
from medgemma_edge.backends.onnx import decoder_io as io
from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import atomic_write

log = logging.getLogger(__name__)

# precision -> (MatMulNBits weight bits (None: plain fp32 graph), values per block along K). Blocks of 32 are
# Q4_0's and the default; 128 stores a quarter of the scales and runs ONNX Runtime's faster CPU kernel for
# prompts (docs/onnx-decoder.md, "Block size")
ONNX_DECODER_PRECISIONS: dict[str, tuple[int | None, int]] = {
    "fp32": (None, BLOCK_SIZE), "int8": (8, BLOCK_SIZE), "int4": (4, BLOCK_SIZE), "int4_b128": (4, 128)}
# MatMulNBits accuracy_level: 0 keeps fp32 activations; 4 quantizes them to int8 per block (faster
# prefill). See docs/onnx-decoder.md for the greedy agreement of both on the parity prompts.
DEFAULT_ACCURACY_LEVEL = 4
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
_BASE_RAM = 900 << 20  # the converting process before the decoder starts: Python, torch, onnx, numpy


def write_onnx_decoder(ckpt: Checkpoint, spec: MedGemmaSpec, out: Path, precision: str,
                       accuracy_level: int = DEFAULT_ACCURACY_LEVEL, attention: str = "fused") -> dict[str, Any]:
    """Write `out` and `out`.data; returns the manifest recipe.

    attention "fused": ONNX Runtime's CPU kernels for Attention and TensorScatter (opset 24); "portable": the
    same graph contract from ops every execution provider implements (opset 17; docs/onnx-decoder.md)."""
    if precision not in ONNX_DECODER_PRECISIONS:
        raise UserError(f"--onnx-decoder {precision!r} is not supported; choose from {', '.join(ONNX_DECODER_PRECISIONS)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise UserError(f"ONNX decoder accuracy_level {accuracy_level!r} is not one of {ACCURACY_LEVELS}")
    if attention not in ATTENTION:
        raise UserError(f"--onnx-attention {attention!r} is not supported; choose from {', '.join(ATTENTION)}")
    bits, block_size = ONNX_DECODER_PRECISIONS[precision]
    t = spec.text
    odd = sorted({k for _, k in _linears(t) if k % block_size})
    if bits and odd:
        raise UserError(f"--onnx-decoder {precision}: reduction widths {odd} are not multiples of the "
                        f"{block_size}-value quantization block; convert this checkpoint with --onnx-decoder fp32")
    data_path = out.with_name(out.name + ".data")
    with ExternalData(data_path) as data:
        graph = Graph(data)
        DecoderGraph(graph, Weights(ckpt), t, Quant(bits, accuracy_level, block_size), attention).build()
        opset = PORTABLE_OPSET if attention == "portable" else OPSET
        model = graph.model("medgemma_decoder", f"{io.GRAPH_FORMAT}: Gemma 3 decoder, {precision}, {attention}",
                            opset)
    atomic_write(out, model.SerializeToString())
    log.info("wrote ONNX decoder %s (%s): graph %.1f KiB, weights %.1f MiB", out.name, precision,
             out.stat().st_size / 2**10, data_path.stat().st_size / 2**20)
    recipe: dict[str, Any] = {
        "writer": "medgemma-edge onnx_decoder (direct graph, streamed weights)",
        "graph_format": io.GRAPH_FORMAT, "opset": opset, "ms_opset": 1, "attention_ops": attention,
        "attention": ("ONNX Attention (q_num_heads/kv_num_heads)" if attention == "fused" else
                      "MatMul and Softmax, each kv head broadcast over its query heads (no repeated K/V),")
                     + " over the whole cache buffer with the runtime's additive mask: causal text, bidirectional "
                       "image spans, sliding window q - k < window",
        "kv_cache": "caller-owned fp32 buffers [1, kv_heads, capacity, head_dim] per layer, written in place by "
                    + ("TensorScatter (circular)" if attention == "fused"
                       else "ScatterElements at (write + i) mod capacity")
                    + "; local layers keep a ring of window + chunk - 1 positions",
        "fused": ["q_proj+k_proj+v_proj", "gate_proj+up_proj"],
        "norms": "Gemma RMSNorm as SimplifiedLayerNormalization, weights stored as 1 + w",
        "logits": "positions listed in logits_index only (the last one while generating)",
    }
    if bits is None:
        recipe.update({"weights": "fp32", "embedding": "fp32 Gather, tied LM head as Gemm(transB)"})
    else:
        recipe.update({
            "quantizer": "medgemma-edge onnx_blockquant (round to nearest, symmetric)", "bits": bits,
            "block_size": block_size, "symmetric": True, "weight_only": True, "accuracy_level": accuracy_level,
            "layout": f"MatMulNBits B uint8 [N, K/{block_size}, {block_size * bits // 8}] "
                      + ("(two codes per byte, first in the low nibble) " if bits == 4 else "")
                      + f"and fp32 scales [N, K/{block_size}]; code = round(w / scale) + {1 << (bits - 1)}, "
                        f"scale = max-magnitude value / -{1 << (bits - 1)}, no zero-point tensor",
            "embedding": "one block-quantized table: GatherBlockQuantized lookup and the tied LM head's MatMulNBits",
        })
    return recipe


def _linears(t: TextSpec) -> list[tuple[int, int]]:
    """(N, K) of every weight the graph stores, the embedding first."""
    qkv = ((t.num_heads + 2 * t.num_kv_heads) * t.head_dim, t.hidden_size)
    o = (t.hidden_size, t.num_heads * t.head_dim)
    gate_up = (2 * t.intermediate_size, t.hidden_size)
    down = (t.hidden_size, t.intermediate_size)
    return [(t.vocab_size, t.hidden_size)] + [qkv, o, gate_up, down] * t.num_layers


def estimate_disk(spec: MedGemmaSpec, precision: str) -> int:
    """Bytes the ONNX decoder artifact takes (graph + external data), a little high."""
    bits, block = ONNX_DECODER_PRECISIONS[precision]
    t = spec.text
    tensors = [quantized_bytes(n, k, bits, block) for n, k in _linears(t)]
    per_tensor = 2 if bits else 1  # codes and scales each start on an aligned offset
    norms = t.num_layers * (4 * t.hidden_size + 2 * t.head_dim) * 4 + t.hidden_size * 4
    graph = t.num_layers * 64 * 1024 + (1 << 20)  # node protos, inline constants
    return sum(tensors) + len(tensors) * per_tensor * ALIGN + norms + graph


def estimate_ram(spec: MedGemmaSpec, precision: str) -> int:
    """Peak resident bytes while writing the artifact, a little high.

    The embedding phase holds the stored table (read whole, assumed bf16 as published), one chunk of
    rows in fp32 with the quantizer's temporaries, and the table's scales; a layer phase holds its
    largest fused projection in fp32 with the same temporaries. Measured at 4B: docs/onnx-decoder.md.
    """
    bits, block = ONNX_DECODER_PRECISIONS[precision]
    t = spec.text
    work = 3 if bits is None else 6  # fp32 copies alive at once per element: source, blocks, codes, abs...
    vocab, hidden = t.vocab_size, t.hidden_size
    embed = vocab * hidden * 2 + EMBED_CHUNK_ROWS * hidden * 4 * work
    embed += vocab * (hidden // block) * 4 if bits else 0
    largest = max(n * k for n, k in _linears(t)[1:])
    layer = largest * 4 * work
    return _BASE_RAM + max(embed, layer)
