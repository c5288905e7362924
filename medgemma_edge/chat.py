"""MedGemma's chat template, rendered to text parts and image slots (never to a flat string),
so image positions are known exactly and filled with embeddings instead of token ids.

ref: the Gemma 3 chat template (tokenizer_config.json) and Gemma3Processor, which expands each
`<start_of_image>` into "\n\n<start_of_image>" + one `<image_soft_token>` per embedding + "<end_of_image>\n\n".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

BOS_ID = 2
IMAGE_TOKEN_ID = 262144


@dataclass(frozen=True)
class ImageSlot:
    index: int  # which image of the conversation (counting from the first turn) fills this span


Part = Union[str, ImageSlot]


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "model"
    text: str
    n_images: int = 0


def render_conversation(turns: Sequence[Turn], system: str | None = None) -> list[Part]:
    """The whole conversation plus the generation prompt (`<start_of_turn>model\n`).

    Text comes first in a user turn, then its images, as the model card's examples do; the
    template trims each message but not the system text, which prefixes the first user turn.
    """
    parts: list[Part] = [""]
    n_seen = 0
    for i, turn in enumerate(turns):
        prefix = f"{system}\n\n" if system and i == 0 else ""
        parts[-1] += f"<start_of_turn>{turn.role}\n{prefix}{turn.text.strip()}"  # type: ignore[operator]
        for _ in range(turn.n_images):
            parts[-1] += "\n\n<start_of_image>"  # type: ignore[operator]
            parts += [ImageSlot(n_seen), "<end_of_image>\n\n"]
            n_seen += 1
        parts[-1] += "<end_of_turn>\n"  # type: ignore[operator]
    parts[-1] += "<start_of_turn>model\n"  # type: ignore[operator]
    return parts


def render_prompt(prompt: str, n_images: int = 0, system: str | None = None) -> list[Part]:
    """A single user turn followed by the generation prompt."""
    return render_conversation([Turn("user", prompt, n_images)], system)
