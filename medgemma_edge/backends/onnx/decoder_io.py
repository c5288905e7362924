"""The contract between the ONNX decoder graph (written by convert/writers/onnx_decoder.py) and its runtime.

One call evaluates S new positions, either all tokens or all image embeddings. Every layer's KV
cache is a caller-owned buffer [1, kv_heads, capacity, head_dim] that the graph updates in place
(TensorScatter, circular, at `write_index`; the portable graph: ScatterElements at (write_index + i) mod
capacity): on ONNX Runtime's CPU provider the runtime binds each `cache_*` input and its `present_*`
output to the same memory, so nothing is concatenated or copied per step. Which slots
hold which positions, and who may attend to whom, is the runtime's business: it passes one additive
mask per attention type over the capacity of that type's buffers.
"""

from __future__ import annotations

GRAPH_FORMAT = "medgemma-edge static-kv 1"

INPUT_IDS = "input_ids"  # [1, St] int64: looked up and scaled by sqrt(hidden) in the graph
INPUTS_EMBEDS = "inputs_embeds"  # [1, Se, hidden] float32: image embeddings, unscaled; St or Se is 0
POSITION_IDS = "position_ids"  # [1, S] int64, S = Se + St (embeddings first)
LOGITS_INDEX = "logits_index"  # [L] int64: which of the S positions get logits (the last one, or all)
WRITE_INDEX = "write_index"  # [1] int64: the first position written; a buffer of capacity C takes it mod C
MASKS = {"full_attention": "mask_global", "sliding_attention": "mask_local"}  # [1, 1, S, C] float32, 0 or -inf-ish
LOGITS = "logits"  # [L, vocab] float32


def cache_input(layer: int, kind: str) -> str:
    """kind: "key" or "value"."""
    return f"cache_{kind}_{layer}"


def cache_output(layer: int, kind: str) -> str:
    return f"present_{kind}_{layer}"
