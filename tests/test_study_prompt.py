"""Study prompts token for token against transformers: Google's own message lists (the MedGemma 1.5 CT
notebook's volume, the longitudinal CXR notebook's comparison) through the real Gemma 3 chat template and
Gemma3Processor of the tiny checkpoint, against our parts tokenized by the bundle tokenizer (llama.cpp's, the
real Gemma 3 vocabulary). The notebook's slice pixels (its own windowing and JPEG transport, rewritten here
from the notebook cells) are compared with what we hand the encoder.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medgemma_edge.inputs.images import normalise
from medgemma_edge.inputs.sample_series import write_series
from medgemma_edge.runtime.studies import plan_images, plan_volume
from medgemma_edge.runtime.study_prompt import NOTEBOOK_COMPARISON, NOTEBOOK_INSTRUCTION, NOTEBOOK_QUESTION, user_turn
from medgemma_edge.runtime.template import Control, ImageSlot, merged, render_conversation

TOKENS_PER_IMAGE, IMAGE_SIZE = 16, 64  # the tiny checkpoint's


@pytest.fixture(scope="module")
def processor(tiny_ckpt: Path):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_ckpt)
    assert proc.image_seq_length == TOKENS_PER_IMAGE and proc.image_processor.size["height"] == IMAGE_SIZE
    return proc


@pytest.fixture(scope="module")
def tokenizer():
    from convert.synth.tokenizer_files import gemma3_vocab_gguf
    from medgemma_edge.backends.llama_cpp.decoder import LlamaModel

    model = LlamaModel(gemma3_vocab_gguf(), vocab_only=True)
    yield model.tokenizer
    model.close()


def our_ids(turn, tokenizer, system: str | None = None) -> list[int]:
    """Our parts as token ids: text as plain text, controls by id, each image slot as its soft tokens."""
    ids: list[int] = []
    for part in merged(render_conversation([user_turn(turn.content)], system)):
        if isinstance(part, str):
            ids += tokenizer.tokenize(part)
        elif isinstance(part, Control):
            ids.append(part.id)
        else:
            assert isinstance(part, ImageSlot)
            ids += [262144] * TOKENS_PER_IMAGE
    return ids


def notebook_slices(paths: list[Path]) -> list[np.ndarray]:
    """The CT notebook's cells 9-12 on local files: sort by InstanceNumber, sample to 85, HU, three windows."""
    dcms = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: int(d.InstanceNumber))
    if len(dcms) > 85:
        dcms = [dcms[int(round(i / 85 * (len(dcms) - 1)))] for i in range(1, 86)]
    out = []
    for dcm in dcms:
        hu = pydicom.pixels.apply_rescale(dcm.pixel_array, dcm)
        chans = []
        for lo, hi in [(-1024, 1024), (-135, 215), (0, 80)]:
            x = np.clip(hu, lo, hi).astype(np.float32)
            x -= lo
            x /= hi - lo
            x *= 255.0
            chans.append(x)
        out.append(np.round(np.stack(chans, axis=-1), 0).astype(np.uint8))
    return out


def data_url(rgb: np.ndarray) -> str:
    """The notebook's `_encode`: a PIL JPEG at its default quality, as a data URL."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="jpeg")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("n_files", [5, 100])
def test_volume_prompt_and_pixels_equal_the_ct_notebook(processor, tokenizer, tmp_path: Path, n_files: int) -> None:
    paths = write_series(tmp_path / "ct", n_files, size=48, seed=n_files,
                         instance_numbers=list(np.random.default_rng(1).permutation(n_files) + 1))
    slices = notebook_slices(paths)
    content = [{"type": "text", "text": NOTEBOOK_INSTRUCTION}]
    for n, sl in enumerate(slices, 1):
        content += [{"type": "image", "image": data_url(sl)}, {"type": "text", "text": f"SLICE {n}"}]
    content.append({"type": "text", "text": NOTEBOOK_QUESTION})
    ref = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        continue_final_message=False, tokenize=True, return_dict=True,
                                        return_tensors="np")
    turn = plan_volume(tmp_path / "ct", NOTEBOOK_QUESTION)
    assert len(turn.indices) == min(n_files, 85)
    ids = our_ids(turn, tokenizer)
    assert ids == ref["input_ids"][0].tolist()
    text = processor.tokenizer.decode(ids)
    assert "SLICE 85Based on" in text if n_files > 85 else f"SLICE {n_files}Based on" in text  # the trim, as HF
    ours = normalise(np.stack([np.asarray(im) for im in turn.ready(IMAGE_SIZE)]))
    np.testing.assert_allclose(ours, ref["pixel_values"], rtol=0, atol=1e-6)
    assert turn.tokens_bound(TOKENS_PER_IMAGE) >= len(ids)


def test_volume_prompt_with_a_system_turn(processor, tokenizer, tmp_path: Path) -> None:
    write_series(tmp_path / "ct", 3, size=32)
    turn = plan_volume(tmp_path / "ct", "  Is there a lesion?  ", instruction="Review these CT slices.")
    content = [{"type": "text", "text": "Review these CT slices."}]
    for n in (1, 2, 3):
        content += [{"type": "image"}, {"type": "text", "text": f"SLICE {n}"}]
    content.append({"type": "text", "text": "  Is there a lesion?  "})
    messages = [{"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
                {"role": "user", "content": content}]
    images = [Image.new("RGB", (8, 8))] * 3
    ref = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        processor_kwargs={"images": images})
    assert our_ids(turn, tokenizer, "You are an expert radiologist.") == list(np.asarray(ref["input_ids"]).reshape(-1))


def test_comparison_prompt_equals_the_longitudinal_notebook(processor, tokenizer, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    before, after = tmp_path / "before.png", tmp_path / "after.png"
    Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(before)
    Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(after)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(before)},
                                              {"type": "image", "image": Image.open(after)},
                                              {"type": "text", "text": NOTEBOOK_COMPARISON}]}]
    ref = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="np")
    turn = plan_images(NOTEBOOK_COMPARISON, [after], priors=[before])
    assert turn.images == [before, after]  # the prior first
    assert our_ids(turn, tokenizer) == ref["input_ids"][0].tolist()
