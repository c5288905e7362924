"""Block quantization for ONNX Runtime's `MatMulNBits` and `GatherBlockQuantized`: pure numpy primitives.

Layout (ref: onnxruntime docs/ContribOperators.md, MatMulNBits): a weight W [N, K] (N output rows,
K the reduction axis) is cut into blocks of `block` consecutive values along K. Each block stores
one fp32 scale and unsigned codes q = round(w / scale) + 2^(bits-1), so no zero-point tensor is needed
(MatMulNBits' default zero point is 2^(bits-1)). Symmetric as ONNX Runtime's own blockwise
quantizer does it: the value of largest magnitude maps to -2^(bits-1) exactly, using the whole range.
4-bit codes pack two per byte, the first value in the low nibble. B is [N, K/block, block*bits/8].
"""

from __future__ import annotations

import numpy as np

BLOCK_SIZE = 32


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly (bf16 is the top half of an fp32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def packed_shape(n: int, k: int, bits: int, block: int = BLOCK_SIZE) -> tuple[int, int, int]:
    return n, k // block, block * bits // 8


def quantize_blocks(w: np.ndarray, bits: int, block: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """W [N, K] float32 -> (B uint8 [N, K/block, block*bits/8], scales float32 [N, K/block])."""
    n, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    blocks = w.reshape(n, k // block, block)
    # ref: onnxruntime MlasQuantizeBlockwise (symmetric): scale = signed max-magnitude value / -2^(bits-1)
    where = np.abs(blocks).argmax(-1)[..., None]
    peak = np.take_along_axis(blocks, where, -1)[..., 0]
    half = 1 << (bits - 1)
    scales = (peak / np.float32(-half)).astype(np.float32)
    inv = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales != 0)
    codes = np.rint(blocks * inv[..., None])
    codes += half
    np.clip(codes, 0, 2 * half - 1, out=codes)
    q = codes.astype(np.uint8)
    if bits == 8:
        return q, scales
    if bits == 4:
        return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scales
    raise ValueError(f"bits={bits}: only 4 and 8 are supported")


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """The inverse view: (B, scales) -> W [N, K] float32, as MatMulNBits and GatherBlockQuantized read it."""
    if bits == 4:
        q = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
        q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4
    else:
        q = packed
    w = (q.astype(np.float32) - np.float32(1 << (bits - 1))) * scales[..., None]
    return w.reshape(packed.shape[0], -1)


def quantized_bytes(n: int, k: int, bits: int | None, block: int = BLOCK_SIZE) -> int:
    """Bytes a [N, K] weight takes on disk: codes plus fp32 scales, or plain fp32 (bits None)."""
    if bits is None:
        return n * k * 4
    return n * k * bits // 8 + n * (k // block) * 4
