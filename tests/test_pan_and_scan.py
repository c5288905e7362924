"""Pan-and-scan against transformers' Gemma3ImageProcessor (`do_pan_and_scan=True`) and Gemma3Processor:
the crops pixel for pixel (before and after the resize) and the whole prompt token for token, on wide,
tall, square and small images. The parameters are transformers' defaults (256, 4, 1.2), MedGemma's too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgemma_edge.inputs.images import normalise, resize_square
from medgemma_edge.inputs.pan_and_scan import PanAndScan, crop_grid, pan_and_scan
from medgemma_edge.runtime.studies import plan_images
from medgemma_edge.runtime.study_prompt import user_turn
from medgemma_edge.runtime.template import Control, ImageSlot, merged, render_conversation

TOKENS_PER_IMAGE, IMAGE_SIZE = 16, 64
# (width, height) -> crops transformers makes: 3 across; 3 down (the last one shorter); none; none (too small)
CASES = {"wide": ((1200, 400), 3), "tall": ((400, 1000), 3), "square": ((600, 600), 0), "small": ((300, 100), 0),
         "tall_two": ((300, 700), 2)}


@pytest.fixture(scope="module")
def processor(tiny_ckpt: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def tokenizer():
    from convert.synth.tokenizer_files import gemma3_vocab_gguf
    from medgemma_edge.backends.llama_cpp.decoder import LlamaModel

    model = LlamaModel(gemma3_vocab_gguf(), vocab_only=True)
    yield model.tokenizer
    model.close()


def _image(tmp: Path, name: str, size: tuple[int, int]) -> Path:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 255 // w), (yy * 255 // h), (xx + yy) % 256], -1).astype(np.uint8)  # every crop differs
    path = tmp / f"{name}.png"
    Image.fromarray(rgb).save(path)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_crops_equal_transformers(processor, tmp_path: Path, case: str) -> None:
    size, n_crops = CASES[case]
    path = _image(tmp_path, case, size)
    views = pan_and_scan(path)
    assert len(views) == 1 + n_crops and (crop_grid(*size)[0] * crop_grid(*size)[1]) == n_crops
    ip = processor.image_processor
    chw = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    ref_crops = ip.pan_and_scan(chw, 256, 4, 1.2)  # before the resize: the crop boxes themselves
    assert len(ref_crops) == n_crops
    for ours, ref in zip(views[1:], ref_crops):
        np.testing.assert_array_equal(np.asarray(ours).transpose(2, 0, 1), ref)
    # the image processor alone has null parameters (preprocessor_config.json); Gemma3Processor supplies these
    ref = ip(images=Image.open(path), do_pan_and_scan=True, pan_and_scan_min_crop_size=256,
             pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2, return_tensors="np")
    assert list(ref["num_crops"]) == [n_crops]
    pixels = normalise(np.stack([resize_square(v, IMAGE_SIZE) for v in views]))
    np.testing.assert_allclose(pixels, ref["pixel_values"], rtol=0, atol=1e-6)


def _ids(turn, tokenizer) -> list[int]:
    ids: list[int] = []
    for part in merged(render_conversation([user_turn(turn.content)])):
        ids += (tokenizer.tokenize(part) if isinstance(part, str) else [part.id] if isinstance(part, Control)
                else [262144] * TOKENS_PER_IMAGE if isinstance(part, ImageSlot) else [])
    return ids


@pytest.mark.parametrize("cases", [["wide"], ["tall"], ["square"], ["small"], ["wide", "small", "tall_two"]])
def test_prompt_equals_transformers(processor, tokenizer, tmp_path: Path, cases: list[str]) -> None:
    paths = [_image(tmp_path, c, CASES[c][0]) for c in cases]
    question = "Describe this image."
    messages = [{"role": "user", "content": [{"type": "text", "text": question}] +
                 [{"type": "image", "image": Image.open(p)} for p in paths]}]
    ref = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="np", processor_kwargs={"do_pan_and_scan": True})
    turn = plan_images(question, paths, pan=PanAndScan())
    assert turn.n_slots == len(ref["pixel_values"]) == sum(1 + CASES[c][1] for c in cases)
    assert _ids(turn, tokenizer) == ref["input_ids"][0].tolist()
    pixels = normalise(np.stack([resize_square(im, IMAGE_SIZE) for im in turn.images]))
    np.testing.assert_allclose(pixels, ref["pixel_values"], rtol=0, atol=1e-6)
