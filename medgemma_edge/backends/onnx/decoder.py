"""The ONNX Runtime decoder backend: one session holds the weights, each context one KV sequence.

A context owns preallocated cache buffers (backends/onnx/kv_cache.py) bound to the session with IO
binding: the graph writes each step's keys and values into them in place and attends over them with
the masks the context builds, so a step costs the new positions, not a copy of the cache. Logits are
computed for the last position only, unless the caller asks for every position (prompt_logits).
Bundles of the previous release hold a different graph; backends/onnx/legacy_decoder.py runs it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_edge.backends.onnx import decoder_io as io
from medgemma_edge.backends.onnx.kv_cache import CacheGroup
from medgemma_edge.backends.onnx.legacy_decoder import LEGACY_INPUTS, LegacyOnnxDecoder
from medgemma_edge.backends.onnx.session import make_session
from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 256  # most positions one call writes (text runs are split; an image span is one call)


def binds_in_place(providers: list[str]) -> bool:
    """Whether a cache's input and output share one buffer: only where ONNX Runtime's CPU provider runs every
    node. OpenVINO works on host memory directly and corrupts an aliased buffer (benchmarks/README.md,
    "Execution providers"); elsewhere each call writes a second buffer, and the two swap."""
    return providers == ["CPUExecutionProvider"]


class OnnxDecoderModel:
    """The decoder graph in one ONNX Runtime session, shared by every context."""

    def __init__(self, path: Path, config: dict[str, Any], providers: list[str] | None = None,
                 n_threads: int | None = None) -> None:
        t = config["text"]
        self.path = path
        self.config = t
        self.n_embd, self.n_vocab = t["hidden_size"], t["vocab_size"]
        self.tokens_per_image = int(config.get("tokens_per_image") or 0)
        try:
            self.session = make_session(path, providers, n_threads)
        except UserError as exc:
            if "TensorScatter" not in str(exc):
                raise
            import onnxruntime as ort

            raise UserError(f"{path}: onnxruntime {ort.__version__} has no TensorScatter (opset 24), which this ONNX "
                            f"decoder writes its KV cache with; upgrade it: pip install -U 'onnxruntime>=1.32'") from exc
        self.providers = self.session.get_providers()
        names = {i.name for i in self.session.get_inputs()}
        self.legacy = io.WRITE_INDEX not in names and LEGACY_INPUTS <= names
        if not self.legacy and not {io.WRITE_INDEX, io.INPUT_IDS, io.INPUTS_EMBEDS, io.cache_input(0, "key")} <= names:
            raise UserError(f"{path}: not a medgemma-edge ONNX decoder (inputs {sorted(names)[:4]}...); "
                            f"re-run `medgemma-edge convert --onnx-decoder`")

    def new_context(self, n_ctx: int = 4096) -> Any:
        return LegacyOnnxDecoder(self, n_ctx) if self.legacy else OnnxDecoder(self, n_ctx)

    def close(self) -> None:
        self.session = None


class OnnxDecoder:
    """One KV sequence over an OnnxDecoderModel (the runtime's Decoder protocol)."""

    def __init__(self, model: OnnxDecoderModel, n_ctx: int) -> None:
        t = model.config
        self.model, self.path = model, model.path
        self.n_embd, self.n_vocab, self.n_ctx = model.n_embd, model.n_vocab, n_ctx
        window = int(t["sliding_window"])
        # an image span must fit one call (it attends both ways), and the ring must outlast a chunk
        self.chunk = max(model.tokens_per_image, min(window, CHUNK))
        types = list(t["layer_types"])
        self._groups: dict[str, CacheGroup] = {}
        for kind in sorted(set(types)):
            local = kind == "sliding_attention"
            self._groups[kind] = CacheGroup(kind, [i for i, k in enumerate(types) if k == kind],
                                            (int(t["num_kv_heads"]), int(t["head_dim"])),
                                            min(n_ctx, window + self.chunk - 1) if local else n_ctx,
                                            window if local else None)
        self._image_of = np.full(n_ctx, -1, np.int64)  # image span id per position, -1 for text
        self._io = model.session.io_binding()
        self._bound: list[Any] = []  # the OrtValues over our buffers (kept alive while bound)
        self._in_place = binds_in_place(model.providers)
        self._spares: dict[tuple[str, str, int], np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        for group in self._groups.values():
            group.clear()
        self.n_past = 0
        # (start, image?, tokens or embeddings) per call, for a roll-back past the ring; embeddings are the
        # caller's arrays (the image cache's), referenced rather than copied
        self._history: list[tuple[int, bool, np.ndarray]] = []
        self._spans = 0

    def truncate(self, n_keep: int) -> None:
        """Forget positions >= n_keep. When the sliding layers' ring no longer holds the window that
        position n_keep needs, the kept calls are evaluated again (exact, at the cost of a prefill)."""
        n_keep = max(0, n_keep)
        if n_keep >= self.n_past:
            return
        local = self._groups.get("sliding_attention")
        if local is not None and local.window is not None and not local.holds(max(0, n_keep - local.window + 1), n_keep):
            self._replay(n_keep)
        self.n_past = n_keep
        self._history = [call for call in self._history if call[0] < n_keep]

    def _replay(self, n_keep: int) -> None:
        calls = [call for call in self._history if call[0] < n_keep]
        log.info("rolling back to %d of %d positions, beyond the sliding window's ring: recomputing %d calls",
                 n_keep, self.n_past, len(calls))
        self.reset()
        for _, image, payload in calls:
            self._run(payload, image, all_logits=False)

    def eval_tokens(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(tokens, np.int64).reshape(-1)
        if not len(ids):
            return np.zeros((0, self.n_vocab), np.float32)
        self._check_room(len(ids))  # before the first chunk: a refused run changes nothing
        outs = [self._run(ids[i:i + self.chunk], False, all_logits) for i in range(0, len(ids), self.chunk)]
        return np.concatenate(outs) if all_logits else outs[-1]

    def eval_embeddings(self, embd: np.ndarray, all_logits: bool = False) -> np.ndarray:
        if embd.ndim != 2 or embd.shape[1] != self.n_embd:
            raise UserError(f"image embeddings have shape {tuple(embd.shape)}, decoder {self.path.name} expects "
                            f"[tokens, {self.n_embd}]: the encoder belongs to another model")
        if len(embd) > self.chunk:
            raise UserError(f"an image span of {len(embd)} embeddings exceeds the {self.chunk} positions decoder "
                            f"{self.path.name} evaluates at once; the encoder belongs to another model")
        return self._run(np.ascontiguousarray(embd, np.float32), True, all_logits)

    def _check_room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise UserError(f"the conversation needs {self.n_past + n} tokens, more than the context of "
                            f"{self.n_ctx}; raise --ctx or shorten the prompt")

    def _bind_buffers(self) -> None:
        import onnxruntime as ort

        binding = self._io
        binding.clear_binding_outputs()
        binding.bind_output(io.LOGITS, "cpu")  # bound first, so it is get_outputs()[0]
        self._bound = []
        for group in self._groups.values():
            for j, layer in enumerate(group.layers):
                for kind, buffers in (("key", group.keys), ("value", group.values)):
                    value = ort.OrtValue.ortvalue_from_numpy(buffers[j])  # shares the numpy memory
                    out = value if self._in_place else ort.OrtValue.ortvalue_from_numpy(
                        self._spare(group.kind, kind, j, buffers[j]))
                    binding.bind_ortvalue_input(io.cache_input(layer, kind), value)
                    binding.bind_ortvalue_output(io.cache_output(layer, kind), out)
                    self._bound += [value, out]

    def _spare(self, group: str, kind: str, j: int, like: np.ndarray) -> np.ndarray:
        spare = self._spares.get((group, kind, j))
        if spare is None or spare.shape != like.shape:
            spare = self._spares[(group, kind, j)] = np.empty_like(like)
        return spare

    def _swap(self) -> None:
        """After a call that wrote the spare buffers: they now hold the cache (the graph writes whole buffers)."""
        for group in self._groups.values():
            for kind, buffers in (("key", group.keys), ("value", group.values)):
                for j in range(len(buffers)):
                    key = (group.kind, kind, j)
                    buffers[j], self._spares[key] = self._spares[key], buffers[j]

    def _run(self, payload: np.ndarray, image: bool, all_logits: bool) -> np.ndarray:
        p, s = self.n_past, len(payload)
        self._check_room(s)
        grown = [group.reserve(p + s) for group in self._groups.values()]
        if any(grown) or not self._bound or not self._in_place:
            self._bind_buffers()
        span = self._spans if image else -1
        self._image_of[p:p + s] = span
        binding = self._io
        slot_maps = {}
        for kind, group in self._groups.items():
            mask, slot_maps[kind] = group.mask(p, s, self._image_of, span)
            binding.bind_cpu_input(io.MASKS[kind], mask)
        empty_ids, empty_embeds = np.zeros((1, 0), np.int64), np.zeros((1, 0, self.n_embd), np.float32)
        binding.bind_cpu_input(io.INPUT_IDS, empty_ids if image else payload[None])
        binding.bind_cpu_input(io.INPUTS_EMBEDS, payload[None] if image else empty_embeds)
        binding.bind_cpu_input(io.POSITION_IDS, np.arange(p, p + s, dtype=np.int64)[None])
        binding.bind_cpu_input(io.LOGITS_INDEX, np.arange(s, dtype=np.int64) if all_logits
                               else np.array([s - 1], np.int64))
        binding.bind_cpu_input(io.WRITE_INDEX, np.array([p], np.int64))
        binding.bind_output(io.LOGITS, "cpu")  # unallocated again: its row count changes between calls
        try:
            self.model.session.run_with_iobinding(binding)
        except BaseException:
            # the in-place write may have happened: those slots no longer hold what the slot map says
            for group in self._groups.values():
                group.slot_pos[group.slots_of(np.arange(p, p + s))] = -1
            raise
        if not self._in_place:
            self._swap()
        for kind, group in self._groups.items():
            group.slot_pos = slot_maps[kind]
        self.n_past = p + s
        self._history.append((p, image, payload))
        if image:
            self._spans += 1
        return binding.get_outputs()[0].numpy()

    def close(self) -> None:
        self._io.clear_binding_inputs()
        self._io.clear_binding_outputs()
        self._bound = []
        self._spares.clear()
        for group in self._groups.values():
            group.keys.clear()
            group.values.clear()
            group.capacity = 0
            group.slot_pos = np.zeros(0, np.int64)
