"""The transformers fp32 reference that every artifact is measured against, and the parity metrics.

Used by the tests and by the parity report; needs the `convert` extra (torch, transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def messages(prompt: str, n_images: int, system: str | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": [{"type": "text", "text": system}]})
    out.append({"role": "user", "content": [{"type": "text", "text": prompt}] + [{"type": "image"}] * n_images})
    return out


class Reference:
    """Gemma3ForConditionalGeneration in float32 with eager attention, plus its processor."""

    def __init__(self, checkpoint: Path) -> None:
        import torch
        from transformers import AutoProcessor, Gemma3ForConditionalGeneration

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.model, info = Gemma3ForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        # a tensor transformers did not find would be silently random: parity would then be meaningless
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        self.model.eval()

    def inputs(self, prompt: str, images: list[Path], system: str | None = None) -> dict[str, Any]:
        kwargs = {"processor_kwargs": {"images": [Image.open(p) for p in images]}} if images else {}
        return self.processor.apply_chat_template(messages(prompt, len(images), system), add_generation_prompt=True,
                                                  tokenize=True, return_dict=True, return_tensors="pt", **kwargs)

    def prompt_logits(self, prompt: str, images: list[Path], system: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        inputs = self.inputs(prompt, images, system)
        with self.torch.no_grad():
            logits = self.model(**inputs).logits[0]
        return inputs["input_ids"][0].numpy(), logits.float().numpy()

    def greedy(self, prompt: str, images: list[Path], n: int, system: str | None = None) -> tuple[list[int], np.ndarray]:
        """Greedy continuation (stopping at <eos>/<end_of_turn>) and the logits that chose each token."""
        inputs = self.inputs(prompt, images, system)
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True, top_p=None, top_k=None)
        n_prompt = inputs["input_ids"].shape[1]
        tokens = out.sequences[0, n_prompt:].tolist()
        step_logits = np.stack([s[0].float().numpy() for s in out.logits])
        return tokens, step_logits


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def parity(ref: np.ndarray, ours: np.ndarray) -> dict[str, float]:
    """Per-position KL(ref || ours), top-1 agreement and max |logit difference| over a prompt."""
    lp, lq = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return {
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "top1": float((ref.argmax(-1) == ours.argmax(-1)).mean()),
        "max_abs": float(np.abs(ref - ours).max()),
    }


def top2_margin(logits: np.ndarray) -> np.ndarray:
    part = np.sort(logits, axis=-1)[..., -2:]
    return part[..., 1] - part[..., 0]


# Fidelity bounds per artifact, next to the metric they bound. Mean KL(reference || ours) over the
# prompt positions and top-1 agreement, on the tiny synthetic checkpoint (docs/parity.md). f32/fp32
# and f16 follow the contract (KL < 1e-4 / 1e-3); the quantized bounds are ~2x the measured values:
# random weights have no redundancy, so these guard regressions rather than claim quality.
DECODER_BOUNDS: dict[str, tuple[float, float]] = {
    "gguf:f32": (1e-4, 0.95), "gguf:f16": (1e-3, 0.95), "gguf:bf16": (5e-3, 0.95), "gguf:q8_0": (0.1, 0.75),
    "gguf:q4_k_m": (3.5, 0.3), "gguf:q4_0": (8.0, 0.15),
    "onnx:fp32": (1e-4, 0.95), "onnx:int8": (0.1, 0.75), "onnx:int4": (8.0, 0.15),
}
# Extra mean KL an image encoder may add on top of its decoder's bound.
ENCODER_BOUNDS: dict[str, float] = {
    "gguf:f32": 1e-4, "gguf:f16": 1e-3, "gguf:q8_0": 0.02, "onnx:fp32": 1e-4, "onnx:fp16": 1e-3, "onnx:int8": 0.05,
    "onnx:int8_static": 0.05,
}


def decisive_top1(ref: np.ndarray, ours: np.ndarray) -> tuple[float, bool]:
    """(share of decisive positions, top-1 agreement at all of them).

    A position is decisive when the reference's top-2 margin exceeds twice our largest logit error
    there; below that no backend with that error could be held to the order. llama.cpp's CPU GELU
    looks activations up in an fp16 table (ggml-cpu/vec.h, GGML_GELU_FP16): a ~0.5% relative floor.
    """
    decisive = top2_margin(ref) > 2 * np.abs(ref - ours).max(axis=-1)
    return float(decisive.mean()), bool((ref.argmax(-1) == ours.argmax(-1))[decisive].all())
