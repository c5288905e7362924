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
class ImageItem:
    """An image in a turn's content; with pan-and-scan, followed by `crops` crops (each its own image slot)."""

    crops: int = 0


Item = Union[str, ImageItem]


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "model"
    text: str
    n_images: int = 0
    content: tuple[Item, ...] | None = None  # the items in order; None: the text, then `n_images` images

    @property
    def items(self) -> tuple[Item, ...]:
        return self.content if self.content is not None else (self.text, *[ImageItem()] * self.n_images)

    @property
    def n_slots(self) -> int:
        """Image slots the turn fills: each image, and each of its crops."""
        return sum(1 + item.crops for item in self.items if isinstance(item, ImageItem))


def image_parts(first: int, crops: int = 0, markers: Markers = Markers()) -> list[Part]:
    """One image item: its span, or with crops the sentence transformers writes around the original and crops.

    ref: transformers Gemma3Processor.full_image_sequence and replace_image_token (pan-and-scan).
    """
    def span(i: int) -> list[Part]:
        return ["\n\n", Control(markers.boi), ImageSlot(i), Control(markers.eoi), "\n\n"]

    if not crops:
        return span(first)
    parts = ["Here is the original image ", *span(first), " and here are some crops to help you see better "]
    for k in range(crops):
        parts += [" "] * (k > 0) + span(first + 1 + k)
    return parts


def render_conversation(turns: Sequence[Turn], system: str | None = None, markers: Markers = Markers()) -> list[Part]:
    """BOS, the whole conversation and the generation prompt (`<start_of_turn>model\n`).

    Without `content`, text comes first in a user turn, then its images, as the model card's examples do.
    The template trims each text item but not the system text, which prefixes the first user turn; items
    follow each other with nothing between them (ref: Gemma 3 chat_template, `item['text'] | trim`).
    """
    parts: list[Part] = [Control(BOS_ID)]
    n_seen = 0
    for i, turn in enumerate(turns):
        prefix = f"{system}\n\n" if system and i == 0 else ""
        parts += [Control(START_OF_TURN_ID), f"{turn.role}\n{prefix}"]
        for item in turn.items:
            if isinstance(item, str):
                parts.append(item.strip())
            else:
                parts += image_parts(n_seen, item.crops, markers)
                n_seen += 1 + item.crops
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
