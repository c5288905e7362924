"""A study as one user turn: a CT/MR volume, a film with its priors, or images with pan-and-scan.

`plan_volume` reads only headers (milliseconds), so a caller can size the context and run the memory
preflight before any model loads; the volume's slices are rendered when the turn first runs.

    turn = plan_volume("ct_folder/", "Is there a liver lesion?")
    tpi = open_bundle(bundle).config["tokens_per_image"]
    pipe = load(bundle, n_ctx=turn.n_ctx(tpi, 256), slices=turn.fit(tpi, 256))
    result = ask_turn(pipe, turn, sampling=SamplingParams(max_new_tokens=256))
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgemma_edge.inputs.files import prepare_images, with_dicom_context
from medgemma_edge.inputs.images import ImageInput, check_image_path
from medgemma_edge.inputs.pan_and_scan import PanAndScan, pan_and_scan
from medgemma_edge.inputs.priors import comparison_context, order_images
from medgemma_edge.inputs.slices import DEFAULT_WINDOWING, render_volume, windowing
from medgemma_edge.inputs.volumes import MAX_SLICES, Volume, describe, load_volume, sample_indices
from medgemma_edge.runtime.caches import PromptCache
from medgemma_edge.runtime.chat import ChatSession
from medgemma_edge.runtime.generate import GenerationChunk, GenerationResult, collect, stream_parts
from medgemma_edge.runtime.memory import SliceFit
from medgemma_edge.runtime.pipeline import Pipeline
from medgemma_edge.runtime.sampling import SamplingParams
from medgemma_edge.runtime.study_prompt import (NOTEBOOK_INSTRUCTION, comparison_content, images_content,
                                                slice_label, user_turn, volume_content)
from medgemma_edge.runtime.template import Control, ImageSlot, Item, render_conversation

log = logging.getLogger(__name__)


@dataclass
class StudyTurn:
    """One user turn: its content items, the images that fill its slots, and what was read (no PHI)."""

    content: tuple[Item, ...]
    images: list[ImageInput]  # in slot order; a volume's are rendered by `ready`
    sources: list[Path]  # the files behind the images, for the audit log
    info: dict[str, Any] = field(default_factory=dict)
    volume: Volume | None = None
    indices: list[int] = field(default_factory=list)
    windowing: str = DEFAULT_WINDOWING
    q_index: int = -1  # where the question is among the content items (first for plain images)
    prefix: str = ""  # what goes before the question (--dicom-context lines)

    @property
    def question(self) -> str:
        return str(self.content[self.q_index])

    def with_question(self, text: str) -> tuple[Item, ...]:
        """The same turn asking `text` instead (a chat asks its first question about a study planned before)."""
        items = list(self.content)
        items[self.q_index] = self.prefix + text
        return tuple(items)

    @property
    def n_slots(self) -> int:
        return user_turn(self.content).n_slots

    def tokens_bound(self, tokens_per_image: int, system: str | None = None) -> int:
        """At most this many prompt tokens: a text token holds at least one UTF-8 byte."""
        parts = render_conversation([user_turn(self.content)], system)
        return sum(tokens_per_image if isinstance(p, ImageSlot) else 1 if isinstance(p, Control)
                   else len(p.encode("utf-8")) for p in parts)

    def n_ctx(self, tokens_per_image: int, max_new_tokens: int, system: str | None = None) -> int:
        """The context this turn needs: its prompt (bounded as above) and the answer."""
        return self.tokens_bound(tokens_per_image, system) + max_new_tokens

    def fit(self, tokens_per_image: int, max_new_tokens: int, system: str | None = None) -> SliceFit:
        """The context as a function of the slice count, for the memory preflight's refusal."""
        n = max(self.n_slots, 1)
        # per slice: its span, its two markers, "\n\n" twice and the longest label
        per = tokens_per_image + 2 + 4 + len(slice_label(max(n, 10 ** len(str(n)) - 1)))
        total = self.n_ctx(tokens_per_image, max_new_tokens, system)
        return SliceFit(n, per, max(total - n * per, 0))

    def ready(self, image_size: int) -> list[ImageInput]:
        """The images, rendering the volume's slices (once) at the encoder's size."""
        if self.volume is not None and not self.images:
            rendered = render_volume(self.volume, self.indices, image_size, self.windowing)
            self.images = [r.image for r in rendered]
        return self.images


def plan_volume(path: Path, question: str, *, series: str | None = None, max_slices: int = MAX_SLICES,
                slice_order: str = "instance", preset: str = DEFAULT_WINDOWING,
                instruction: str | None = NOTEBOOK_INSTRUCTION, dicom_context: bool = False) -> StudyTurn:
    """A DICOM series or volume at `path`: chosen, ordered, sampled (headers only; pixels later)."""
    windowing(preset)  # refuse an unknown preset before anything is read
    found, volume = load_volume(Path(path), series, slice_order)
    indices = sample_indices(len(volume.slices), max_slices)
    chosen = [volume.slices[i] for i in indices]
    prefix = with_dicom_context("", [chosen[0].path]) if dicom_context else ""
    s = volume.series
    info = {"series": found.index(s), "series_id": s.digest, "modality": s.modality, "orientation": s.orientation,
            "slices_in_series": len(volume.slices), "slices_sampled": len(indices), "order": volume.order,
            "spacing_mm": volume.spacing, "gaps": volume.gaps, "windowing": preset}
    log.info("study: series %d (%s %s), %d of %d slices, order %s, windowing %s", info["series"], s.modality,
             s.orientation, len(indices), len(volume.slices), volume.order, preset)
    if instruction == NOTEBOOK_INSTRUCTION and s.modality != "CT":  # the notebook's words, for this modality
        instruction = instruction.replace("CT slices", f"{s.modality} slices")
    return StudyTurn(volume_content(prefix + question, len(indices), instruction), [],
                     sorted({sl.path for sl in chosen}), info, volume, indices, preset, -1, prefix)


def plan_images(question: str, images: Sequence[Path], priors: Sequence[Path] = (),
                pan: PanAndScan | None = None, frame: int | None = None, dicom_context: bool = False) -> StudyTurn:
    """Current images (with their priors first, when given), each with its pan-and-scan crops when `pan`."""
    for p in [*priors, *images]:
        check_image_path(p)
    paths = order_images(images, priors)
    prefix = ""
    if dicom_context:
        context = comparison_context(paths, len(priors)) if priors else with_dicom_context("", paths).strip()
        prefix = f"{context}\n" if context else ""
    slots: list[ImageInput] = []
    crops: list[int] = []
    for p in paths:
        views = pan_and_scan(p, pan, frame) if pan is not None else prepare_images([p], frame)
        slots += views
        crops.append(len(views) - 1)
    if pan is not None:
        log.info("pan-and-scan: %s crops per image", crops)
    make = comparison_content if priors else images_content
    return StudyTurn(make(prefix + question, len(paths), crops), slots, list(paths),
                     {"priors": len(priors), "pan_and_scan_crops": crops if pan is not None else None},
                     q_index=-1 if priors else 0, prefix=prefix)


def stream_turn(pipe: Pipeline, turn: StudyTurn, system: str | None = None, sampling: SamplingParams | None = None,
                cache: PromptCache | None = None, thinking: bool = False) -> Iterator[GenerationChunk]:
    """Answer the turn, chunk by chunk (the last chunk carries the result). `thinking`: `system` already
    carries the thinking instruction (thinking_system), so a JSON schema allows one thought first."""
    parts = render_conversation([user_turn(turn.content)], system, pipe.facts.markers)
    yield from stream_parts(pipe, parts, turn.ready(pipe.facts.image_size), sampling or SamplingParams(), cache,
                            thinking=thinking)


def ask_turn(pipe: Pipeline, turn: StudyTurn, system: str | None = None, sampling: SamplingParams | None = None,
             cache: PromptCache | None = None, thinking: bool = False) -> GenerationResult:
    return collect(stream_turn(pipe, turn, system, sampling, cache, thinking))


class StudySession(ChatSession):
    """A conversation about one study: the first question (again after reset) carries the study, as
    `plan_volume`/`plan_images` planned it; follow-ups are plain turns, and encode nothing."""

    def __init__(self, pipeline: Pipeline, study: StudyTurn, system: str | None = None, thinking: bool = False) -> None:
        super().__init__(pipeline, system, thinking)
        self.study = study

    def stream_ask(self, text: str, images: Sequence[ImageInput] = (), sampling: SamplingParams | None = None,
                   content: tuple[Item, ...] | None = None) -> Iterator[GenerationChunk]:
        if not self.turns and content is None:
            content = self.study.with_question(text)
            images = [*self.study.ready(self.pipeline.facts.image_size), *images]
            content = (*content, *images_content("", len(images) - self.study.n_slots)[1:])
        return super().stream_ask(text, images, sampling, content)


def study_info(path: Path) -> list[dict[str, Any]]:
    """The series at `path` as `study-info` lists them (no PHI)."""
    from medgemma_edge.inputs.studies import scan

    return describe(scan(Path(path)))
