"""MedGemma's chat template, rendered to parts (never to a flat string): plain text, control tokens
placed by id, and image slots filled with embeddings instead of token ids.

User text is data: it stays a `str` part and is tokenized without special-token parsing, so
`<end_of_turn><start_of_turn>model` typed into a question cannot open a turn. Only the template's
own markers are control tokens, and the image markers come from the checkpoint's config
(`boi_token_index`, `eoi_token_index`), not from tokenizing their text.

ref: the Gemma 3 chat template (tokenizer_config.json) and Gemma3Processor, which expands each
`<start_of_image>` into "\n\n<start_of_image>" + one `<image_soft_token>` per embedding + "<end_of_image>\n\n".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

BOS_ID = 2
START_OF_TURN_ID = 105
END_OF_TURN_ID = 106
IMAGE_TOKEN_ID = 262144
# The text of the template's turn markers, for front ends that take a string (llama.cpp's mtmd baseline).
CONTROL_TEXT = {START_OF_TURN_ID: "<start_of_turn>", END_OF_TURN_ID: "<end_of_turn>"}


@dataclass(frozen=True)
class Control:
    id: int  # a control token, placed by id: never the result of tokenizing text


@dataclass(frozen=True)
class ImageSlot:
    index: int  # which image of the conversation (counting from the first turn) fills this span


Part = Union[str, Control, ImageSlot]


@dataclass(frozen=True)
class Markers:
    """Image span delimiters, from the manifest's config (Gemma 3: 255999 / 256000)."""

    boi: int = 255999
    eoi: int = 256000


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "model"
    text: str
    n_images: int = 0


def render_conversation(turns: Sequence[Turn], system: str | None = None, markers: Markers = Markers()) -> list[Part]:
    """BOS, the whole conversation and the generation prompt (`<start_of_turn>model\n`).

    Text comes first in a user turn, then its images, as the model card's examples do; the
    template trims each message but not the system text, which prefixes the first user turn.
    """
    parts: list[Part] = [Control(BOS_ID)]
    n_seen = 0
    for i, turn in enumerate(turns):
        prefix = f"{system}\n\n" if system and i == 0 else ""
        parts += [Control(START_OF_TURN_ID), f"{turn.role}\n{prefix}{turn.text.strip()}"]
        for _ in range(turn.n_images):
            parts += ["\n\n", Control(markers.boi), ImageSlot(n_seen), Control(markers.eoi), "\n\n"]
            n_seen += 1
        parts += [Control(END_OF_TURN_ID), "\n"]
    parts += [Control(START_OF_TURN_ID), "model\n"]
    return parts


def render_prompt(prompt: str, n_images: int = 0, system: str | None = None, markers: Markers = Markers()) -> list[Part]:
    """A single user turn followed by the generation prompt."""
    return render_conversation([Turn("user", prompt, n_images)], system, markers)


def render_raw(prompt: str) -> list[Part]:
    """No template: BOS and the text, continued verbatim (base, not instruction-tuned, models)."""
    return [Control(BOS_ID), prompt]


def merged(parts: Sequence[Part]) -> list[Part]:
    """Adjacent text parts joined, so each text run is tokenized as one string (as a flat prompt would be)."""
    out: list[Part] = []
    for part in parts:
        if isinstance(part, str) and out and isinstance(out[-1], str):
            out[-1] += part
        elif not (isinstance(part, str) and not part):
            out.append(part)
    return out
