"""Text-only Gemma 3 (MedGemma 27B text-it, Gemma 3 1B/270M, any `Gemma3ForCausalLM`).

Its config is flat (`model_type: gemma3_text`: the text config of the multimodal family, without a
`text_config` around it) and its tensors are `model.layers.*`, `model.embed_tokens.weight`,
`model.norm.weight`, with the LM head tied to the embedding. The decoder is the multimodal family's,
so its spec, refusals and GGUF tensor table are shared (convert/models/gemma3.py); the spec simply
has no vision part, and the bundle no encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convert.models.gemma3 import MedGemmaSpec, eos_ids, refuse, text_problems, text_spec
from convert.registry import Family, register
from medgemma_edge.errors import UserError

ARCHITECTURE = "Gemma3ForCausalLM"
MODEL_TYPE = "gemma3_text"

# transformers saves Gemma3ForCausalLM as `model.*` plus (when untied) `lm_head.weight`.
PREFIXES: tuple[tuple[str, str], ...] = (("model.", "text."),)
IGNORED = ("lm_head.", "text.lm_head.")  # tied to the embedding; llama.cpp writes no output tensor


def spec_from_config(cfg: dict[str, Any], source: str = "config.json") -> MedGemmaSpec:
    if "text_config" in cfg or "vision_config" in cfg:
        raise UserError(f"{source}: architectures says {ARCHITECTURE} but the config nests text_config/vision_config "
                        f"(a multimodal layout); set architectures to Gemma3ForConditionalGeneration or re-save it")
    if cfg.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise UserError(f"{source}: model_type {cfg.get('model_type')!r} with architectures {ARCHITECTURE}; a text-only "
                        f"Gemma 3 config has model_type {MODEL_TYPE!r}")
    try:
        text = text_spec(cfg)
        spec = MedGemmaSpec(text=text, vision=None, tokens_per_image=0,
                            boi_token_id=int(cfg.get("boi_token_index", 255999)),
                            eoi_token_id=int(cfg.get("eoi_token_index", 256000)),
                            image_token_id=int(cfg.get("image_token_index", 262144)),
                            eos_token_ids=eos_ids(cfg, cfg), architecture=ARCHITECTURE)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{source}: malformed Gemma 3 text config ({exc!r}); is this a Gemma3ForCausalLM "
                        f"checkpoint?") from exc
    refuse(text_problems(text), source)
    return spec


def _parse(cfg: dict[str, Any], source: str, folder: Path | None) -> MedGemmaSpec:
    return spec_from_config(cfg, source)


FAMILY = register(Family(ARCHITECTURE, _parse, PREFIXES, IGNORED, "MedGemma 27B text-it and other text-only Gemma 3"))
