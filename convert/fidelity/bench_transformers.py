"""The transformers fp32 baseline for `medgemma-edge bench`: one measured run in a fresh process.

Same scenario and output as medgemma_edge/measure/worker.py (which the runtime uses without torch):
load, vision encode + prefill + a short greedy decode, then a follow-up question on the KV cache.
Timings of the vision part come from hooks on the vision tower and projector, so the image is
encoded once, inside the same forward pass a user's `generate` would run.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from medgemma_edge.measure.worker import RESULT_PREFIX, CpuWatch, peak_rss_mb


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from PIL import Image

    from convert.fidelity.reference import messages, reference_classes

    watch = CpuWatch()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model_cls, processor_cls, text_only = reference_classes(spec["reference"])  # Gemma3ForCausalLM when text-only
    processor = processor_cls.from_pretrained(spec["reference"])
    model = model_cls.from_pretrained(spec["reference"], dtype=torch.float32).eval()
    tokenizer = processor if text_only else processor.tokenizer
    load_s = time.perf_counter() - t0

    marks: dict[str, float] = {}

    def mark(name: str) -> Any:
        def hook(*_: Any) -> None:  # returning None leaves the module's inputs/outputs alone
            marks.setdefault(name, time.perf_counter())
        return hook

    if not text_only:
        model.model.vision_tower.register_forward_pre_hook(mark("enc0"))
        model.model.multi_modal_projector.register_forward_hook(mark("enc1"))

    def step(ids: torch.Tensor, past: Any, **extra: Any) -> tuple[int, Any]:
        out = model(input_ids=ids, past_key_values=past, use_cache=True, **extra)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    with torch.inference_mode():
        t0 = time.perf_counter()
        images = [Image.open(p).convert("RGB") for p in spec["images"]]
        inputs = processor.apply_chat_template(
            messages(spec["prompt"], len(images), spec["system"]), add_generation_prompt=True, tokenize=True,
            return_dict=True, return_tensors="pt", **({"processor_kwargs": {"images": images}} if images else {}))
        prompt_ids = inputs.pop("input_ids")
        tok, past = step(prompt_ids, None, **inputs)
        t_first = time.perf_counter()
        tokens = [tok]
        n = spec["reference_tokens"]
        mask = inputs.get("attention_mask")
        for _ in range(n - 1):  # EOS ignored, like every other combination
            mask = None if mask is None else torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            tok, past = step(torch.tensor([[tokens[-1]]]), past, attention_mask=mask)
            tokens.append(tok)
        decode_s = time.perf_counter() - t_first
        # follow-up: the answer's last token and the next user turn, on the same cache
        follow = tokenizer(f"<end_of_turn>\n<start_of_turn>user\n{spec['followup']}<end_of_turn>\n"
                                     f"<start_of_turn>model\n", add_special_tokens=False, return_tensors="pt")
        ids = torch.cat([torch.tensor([[tokens[-1]]]), follow["input_ids"]], dim=1)
        mask = None if mask is None else torch.cat([mask, mask.new_ones(1, ids.shape[1])], dim=1)
        t1 = time.perf_counter()
        step(ids, past, attention_mask=mask)
        followup_ms = (time.perf_counter() - t1) * 1e3
    n_image = 0 if text_only else int((prompt_ids == model.config.image_token_id).sum())
    encode_ms = (marks["enc1"] - marks["enc0"]) * 1e3 if "enc1" in marks else 0.0
    n_prompt = int(prompt_ids.shape[1])
    prefill_s = (t_first - t0) - encode_ms / 1e3
    return {"load_s": load_s, "image_encode_ms": encode_ms, "prefill_image_tokens_per_s": None,
            "prefill_text_tokens_per_s": None, "prefill_tokens_per_s": n_prompt / prefill_s if prefill_s > 0 else None,
            "ttft_ms": (t_first - t0) * 1e3, "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s else 0.0,
            "followup_ttft_ms": followup_ms, "image_tokens": n_image, "prompt_tokens": n_prompt,
            "tokens": tokens[:8], "peak_rss_mb": peak_rss_mb(), "other_cores": watch.other_cores()}


def main() -> None:
    print(RESULT_PREFIX + json.dumps(run(json.loads(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()
