"""MedGemma's chat template, rendered to text parts and image slots (never to a flat string),
so image positions are known exactly and filled with embeddings instead of token ids.

ref: the Gemma 3 chat template (tokenizer_config.json) and Gemma3Processor, which expands each
`<start_of_image>` into "\n\n<start_of_image>" + one `<image_soft_token>` per embedding + "<end_of_image>\n\n".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

BOS_ID = 2
IMAGE_TOKEN_ID = 262144


@dataclass(frozen=True)
class ImageSlot:
    index: int  # which of the turn's images fills this span


Part = Union[str, ImageSlot]


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "model"
    text: str
    n_images: int = 0


def render_turn(turn: Turn, system: str | None = None) -> list[Part]:
    """One turn as text parts and image slots; text first, then images, as the model card shows."""
    prefix = f"{system}\n\n" if system else ""  # the template does not trim the system text
    parts: list[Part] = [f"<start_of_turn>{turn.role}\n{prefix}{turn.text.strip()}"]
    for i in range(turn.n_images):
        parts[-1] += "\n\n<start_of_image>"  # type: ignore[operator]
        parts += [ImageSlot(i), "<end_of_image>\n\n"]
    parts[-1] += "<end_of_turn>\n"  # type: ignore[operator]
    return parts


def render_prompt(prompt: str, n_images: int = 0, system: str | None = None) -> list[Part]:
    """A single user turn followed by the generation prompt (`<start_of_turn>model\n`)."""
    parts = render_turn(Turn("user", prompt, n_images), system)
    parts[-1] += "<start_of_turn>model\n"  # type: ignore[operator]
    return parts
