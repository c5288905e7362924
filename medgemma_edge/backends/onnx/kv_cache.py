"""The KV cache of one ONNX decoder context: preallocated buffers per attention type, and their masks.

Global layers keep one slot per position (slot = position) in a buffer that grows in steps up to
n_ctx. Sliding-window layers keep a ring of `window + chunk - 1` slots (slot = position mod
capacity): a chunk of up to `chunk` new positions overwrites only positions that no query of the
chunk, nor any later one, may still see. The graph writes the new keys and values in place
(TensorScatter, circular), then attends over the whole buffer; the mask built here decides what
each query sees, with transformers' rule:
(key <= query and, on sliding layers, query - key < window) or (both in the same image span).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NEG = np.float32(-1e30)  # additive mask value: exp() underflows to 0 without producing NaN
GRANULE = 256  # buffers grow in multiples of this many slots


@dataclass
class CacheGroup:
    """The buffers of every layer of one attention type ("full_attention" or "sliding_attention")."""

    kind: str
    layers: list[int]
    shape: tuple[int, int]  # (kv_heads, head_dim)
    limit: int  # the most slots: n_ctx for global layers, the ring size for sliding ones
    window: int | None  # sliding window (None: global)
    capacity: int = 0
    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    slot_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # position per slot, -1 empty

    def reserve(self, need: int) -> bool:
        """Make room for positions < need (up to the limit); True when the buffers were reallocated.

        Below the limit nothing has wrapped yet (slot = position), so growing is a plain copy.
        """
        if self.capacity >= min(need, self.limit):
            return False
        grown = max(need, self.capacity + self.capacity // 8)  # amortised: few copies even at 128K
        cap = min(self.limit, -(-grown // GRANULE) * GRANULE)
        kv, d = self.shape
        old = self.capacity
        for buffers in (self.keys, self.values):
            for j in range(len(self.layers)):
                fresh = np.zeros((1, kv, cap, d), np.float32)
                if old:
                    fresh[:, :, :old] = buffers[j]
                if j < len(buffers):
                    buffers[j] = fresh
                else:
                    buffers.append(fresh)
        slots = np.full(cap, -1, np.int64)
        slots[:old] = self.slot_pos
        self.slot_pos, self.capacity = slots, cap
        return True

    def clear(self) -> None:
        self.slot_pos[:] = -1

    def slots_of(self, positions: np.ndarray) -> np.ndarray:
        return positions % self.capacity

    def holds(self, start: int, stop: int) -> bool:
        """Whether every position in [start, stop) is still in its slot."""
        if stop <= start:
            return True
        positions = np.arange(start, stop)
        return self.capacity > 0 and bool((self.slot_pos[self.slots_of(positions)] == positions).all())

    def mask(self, start: int, n: int, image_of: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
        """(additive mask [1, 1, n, capacity], slot map after the write) for n new positions from `start`.

        `image_of[p]` is the image span id of position p (-1 for text) with the new positions filled
        in; `span` is the new positions' span id, or -1 for text.
        """
        new = np.arange(start, start + n)
        slot_pos = self.slot_pos.copy()
        slot_pos[self.slots_of(new)] = new
        valid = (slot_pos >= 0) & (slot_pos < start + n)  # slots past the end hold rolled-back positions
        key = np.where(valid, slot_pos, 0)[None, :]
        query = new[:, None]
        allow = key <= query
        if self.window is not None:
            allow &= query - key < self.window  # ref: transformers sliding_window_overlay: q - kv < window
        if span >= 0:
            allow |= image_of[key] == span  # a whole image span sees itself both ways
        allow &= valid[None, :]
        return np.where(allow, np.float32(0), NEG)[None, None], slot_pos
