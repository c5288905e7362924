"""Image files as a caller hands them in (CLI, chat, server, batch): each checked from its header before
any model loads, DICOM rendered at the frame asked for, and the opt-in DICOM context for the prompt."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.dicom import dicom_context, is_dicom, render
from medgemma_edge.inputs.images import IMAGE_SUFFIXES, ImageInput, check_image_path


def prepare_images(paths: Sequence[Path], dicom_frame: int | None = None) -> list[ImageInput]:
    """Check every image now (milliseconds, no pixels decoded); render DICOM at `dicom_frame` when given."""
    for path in paths:
        check_image_path(path)
    if dicom_frame is not None and paths and not any(is_dicom(p) for p in paths):
        raise UserError(f"{paths[0]}: --dicom-frame picks a frame of a multi-frame DICOM, and no image given is "
                        f"DICOM; drop --dicom-frame")
    return [render(p, dicom_frame) if dicom_frame is not None and is_dicom(p) else p for p in paths]


def with_dicom_context(prompt: str, paths: Sequence[Path]) -> str:
    """Modality, body part and view of each DICOM image, and nothing else, before the question."""
    lines = [dicom_context(p) for p in paths if is_dicom(p)]
    return "\n".join([line for line in lines if line] + [prompt])


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder, sorted by name: PNG/JPEG/TIFF by suffix, DICOM by content; hidden files skipped."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and (p.suffix.lower() in IMAGE_SUFFIXES or is_dicom(p)))
