"""The user turn of a study, as Google's notebooks write it, as template content items (text and images).

- A volume (ref: google-health/medgemma notebooks/high_dimensional_ct_hugging_face.ipynb, cell h57n3PWsznxy):
  the instruction, then each slice image followed by its label "SLICE n", then the question LAST
  (question first makes MedGemma 1.5 write a chest X-ray report: google-health/medgemma #76). Rendered by the
  Gemma 3 template, every text item is trimmed and nothing separates items: the notebook's "\\n\\n" before
  its question is trimmed away, so "SLICE 85" is followed directly by the question; the processor's
  "\\n\\n" around each image span are what separate the labels.
- A comparison (ref: notebooks/cxr_longitudinal_comparison_with_hugging_face.ipynb): the images, prior
  first, then the question; no labels.
- Single images keep the model card's order (question, then images); pan-and-scan adds crops to an image.
"""

from __future__ import annotations

from collections.abc import Sequence

from medgemma_edge.runtime.template import ImageItem, Item, Turn

# ref: the CT notebook's `instruction`, verbatim. It names the abdomen: pass your own for other studies.
NOTEBOOK_INSTRUCTION = ("You are an instructor teaching medical students. You are analyzing a contiguous block of "
                        "CT slices from the center of the abdomen. Please review the slices provided below carefully.")
# ref: the CT notebook's `query_text`, verbatim (its leading "\n\n" is trimmed by the template).
NOTEBOOK_QUESTION = ("\n\nBased on the visual evidence in the slices provided above, is this image a good teaching "
                     "example of liver pathology? Comment on hypodense lesions or other hepatic irregularities. Do "
                     "not comment on findings outside the liver. Please provide your reasoning and conclude with a "
                     "'Final Answer: yes' or 'Final Answer: no'.")
# ref: the longitudinal CXR notebook's `prompt`, verbatim.
NOTEBOOK_COMPARISON = ("Provide a comparison of these two images and include details from\nthe image which students "
                       "should take note of when reading longitudinal CXR\n")


def slice_label(n: int) -> str:
    return f"SLICE {n}"  # upper case, one space, 1-based, nothing else


def volume_content(question: str, n_slices: int, instruction: str | None = NOTEBOOK_INSTRUCTION) -> tuple[Item, ...]:
    """[instruction, image 1, "SLICE 1", ..., image n, "SLICE n", question]."""
    items: list[Item] = [instruction] if instruction else []
    for n in range(1, n_slices + 1):
        items += [ImageItem(), slice_label(n)]
    return (*items, question)


def comparison_content(question: str, n_images: int, crops: Sequence[int] = ()) -> tuple[Item, ...]:
    """[image 1 (the oldest prior), ..., the current image(s), question]."""
    return (*_images(n_images, crops), question)


def images_content(question: str, n_images: int, crops: Sequence[int] = ()) -> tuple[Item, ...]:
    """[question, image 1, ...]: the order of a plain question (`render_prompt`), with crops where given."""
    return (question, *_images(n_images, crops))


def _images(n: int, crops: Sequence[int]) -> list[ImageItem]:
    counts = list(crops) or [0] * n
    if len(counts) != n:
        raise ValueError(f"{n} images but {len(counts)} crop counts")
    return [ImageItem(c) for c in counts]


def user_turn(content: Sequence[Item]) -> Turn:
    """A user turn holding `content`; its `text` (for history and audit) is the content's text items joined."""
    text = "\n".join(item for item in content if isinstance(item, str))
    return Turn("user", text, content=tuple(content))
