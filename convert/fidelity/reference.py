"""The transformers fp32 reference that every artifact is measured against (metrics: fidelity/metrics.py).

Used by the tests, `validate` and the parity report; needs the `convert` extra (torch, transformers).
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


def reference_classes(checkpoint: Path) -> tuple[Any, Any, bool]:
    """(model class, processor class, text_only): Gemma3ForCausalLM with its tokenizer for a text-only
    checkpoint, Gemma3ForConditionalGeneration with its processor otherwise."""
    from transformers import AutoProcessor, AutoTokenizer, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    from convert.registry import load_spec

    if load_spec(Path(checkpoint)).vision is None:
        return Gemma3ForCausalLM, AutoTokenizer, True
    return Gemma3ForConditionalGeneration, AutoProcessor, False


# the decoder in eager attention (every mask spelled out: causal text, bidirectional image spans, the window);
# the vision tower, which has no mask, in sdpa: eager materializes 16 x 4096 x 4096 fp32 attention weights per
# layer (2.7 GB more at the 4B's peak), and sdpa's image features differ from eager's by 1.5e-6
REFERENCE_ATTENTION = {"text_config": "eager", "vision_config": "sdpa"}
ATTENTION_NAME = "eager attention (vision tower: sdpa)"


def reference_name(checkpoint: Path) -> str:
    model_cls, _, text_only = reference_classes(checkpoint)
    return f"transformers {model_cls.__name__}, float32, " + ("eager attention" if text_only else ATTENTION_NAME)


class Reference:
    """Gemma3ForConditionalGeneration (or Gemma3ForCausalLM for a text-only checkpoint) in float32 with
    eager attention in the decoder, plus its processor (or tokenizer)."""

    def __init__(self, checkpoint: Path) -> None:
        import torch

        self.torch = torch
        model_cls, processor_cls, self.text_only = reference_classes(checkpoint)
        self.processor = processor_cls.from_pretrained(checkpoint)
        self.model, info = model_cls.from_pretrained(
            checkpoint, dtype=torch.float32, output_loading_info=True,
            attn_implementation="eager" if self.text_only else REFERENCE_ATTENTION)
        # a tensor transformers did not find would be silently random: parity would then be meaningless
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        self.model.eval()

    def inputs(self, prompt: str, images: list[Path], system: str | None = None) -> dict[str, Any]:
        if images and self.text_only:
            raise ValueError("a text-only reference takes no images")
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
