"""Tokenizer/processor files rebuilt from the real Gemma 3 vocabulary (gemma3-270m GGUF): SentencePiece,
transformers and llama.cpp must all agree, and the processor must expand images as Gemma 3 does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert.synth.tokenizer_files import CACHED_FILES, cached_tokenizer_dir, gemma3_vocab_gguf, write_tokenizer_files

TOKENS_PER_IMAGE = 16
IMAGE_SIZE = 64
# Text without control tokens: HF, SentencePiece and llama.cpp must give identical ids.
PLAIN_TEXTS = [
    "Hello world", "  leading spaces", "Café naïve résumé", "12345 67,89", "😀 emoji 🩻 x", "a\n\nb",
    "line\n\n\n  indented", " " * 40 + "x", "x  ", "\t\tdef f():\n    return 1", "<b>bold</b> <table>",
    "The patient's CXR: 3.5 cm nodule, RUL.", "Ελληνικά русский 中文 日本語 한국어 العربية", "\n" * 40,
]
MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
    {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"}, {"type": "image"}]},
]
EXPECTED_PROMPT = ("<bos><start_of_turn>user\nYou are an expert radiologist.\n\nDescribe this X-ray"
                   "<start_of_image><end_of_turn>\n<start_of_turn>model\n")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A fresh cache, so the session really rebuilds from the GGUF instead of trusting an old entry.
    root = tmp_path_factory.mktemp("medgemma-edge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDGEMMA_EDGE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def checkpoint(cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Gemma3Config

    out = tmp_path_factory.mktemp("ckpt")
    names = write_tokenizer_files(out, tokens_per_image=TOKENS_PER_IMAGE, image_size=IMAGE_SIZE)
    assert sorted(names) == sorted(p.name for p in out.iterdir())
    config = Gemma3Config(
        text_config=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=128, query_pre_attn_scalar=128, vocab_size=262208),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        mm_tokens_per_image=TOKENS_PER_IMAGE)
    config.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def sp_model(checkpoint: Path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))


def test_written_files(checkpoint: Path) -> None:
    expected = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "processor_config.json", "preprocessor_config.json"}
    assert expected <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "processor_config.json").read_text()) == {
        "image_seq_length": TOKENS_PER_IMAGE, "processor_class": "Gemma3Processor"}
    pre = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE} and pre["resample"] == 2
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5] and pre["rescale_factor"] == pytest.approx(1 / 255)
    assert json.loads((checkpoint / "added_tokens.json").read_text()) == {"<image_soft_token>": 262144}
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    for token_id, content in {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>",
                              106: "<end_of_turn>", 255999: "<start_of_image>", 256000: "<end_of_image>",
                              262144: "<image_soft_token>"}.items():
        assert decoder[str(token_id)]["content"] == content and decoder[str(token_id)]["special"]
    assert decoder["107"] == {"content": "\n", "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": False}
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["model_max_length"] == 131072 and config["image_token"] == "<image_soft_token>"


def test_sentencepiece_model(checkpoint: Path, sp_model) -> None:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString((checkpoint / "tokenizer.model").read_bytes())
    assert proto.trainer_spec.model_type == spm_pb2.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    norm = proto.normalizer_spec
    assert not norm.add_dummy_prefix and not norm.remove_extra_whitespaces and norm.escape_whitespaces
    assert sp_model.get_piece_size() == 262144
    assert (sp_model.pad_id(), sp_model.eos_id(), sp_model.bos_id(), sp_model.unk_id()) == (0, 1, 2, 3)
    assert sp_model.id_to_piece(105) == "<start_of_turn>" and sp_model.id_to_piece(255999) == "<start_of_image>"
    assert sp_model.is_byte(238) and sp_model.id_to_piece(238) == "<0x00>"
    assert sp_model.encode("Hello world", out_type=str) == ["Hello", "▁world"]
    for text in PLAIN_TEXTS:
        assert sp_model.decode(sp_model.encode(text)) == text


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_hf_matches_sentencepiece(hf_tokenizer, sp_model, text: str) -> None:
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids == sp_model.encode(text)
    assert hf_tokenizer.decode(ids) == text


def test_hf_matches_llama_cpp(hf_tokenizer) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gemma3_vocab_gguf()), vocab_only=True, verbose=False)
    texts = PLAIN_TEXTS + ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<unused5><mask>"]
    for text in texts:
        expected = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == expected, text
    assert hf_tokenizer.encode("Hi")[0] == 2  # bos added by default, as llama.cpp's add_bos_token


def test_chat_template_text(checkpoint: Path, hf_tokenizer) -> None:
    assert hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT
    chat = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}]
    assert hf_tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
        "<start_of_turn>user\nbye<end_of_turn>\n")


def test_processor_expands_image(checkpoint: Path, hf_tokenizer) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    assert type(processor).__name__ == "Gemma3Processor"
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8))
    out = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        processor_kwargs={"images": [image]})
    ids = np.asarray(out["input_ids"]).reshape(-1).tolist()
    assert ids[0] == 2 and ids.count(2) == 1
    boi = ids.index(255999)
    assert ids[boi + 1: boi + 1 + TOKENS_PER_IMAGE] == [262144] * TOKENS_PER_IMAGE
    assert ids[boi + 1 + TOKENS_PER_IMAGE] == 256000 and ids.count(262144) == TOKENS_PER_IMAGE
    tail = hf_tokenizer.encode("<start_of_turn>model\n", add_special_tokens=False)
    assert tail == [105, 4368, 107] and ids[-3:] == tail
    token_types = np.asarray(out["token_type_ids"]).reshape(-1)
    assert token_types.tolist() == [int(i == 262144) for i in ids]
    assert np.asarray(out["pixel_values"]).shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_second_write_uses_cache(checkpoint: Path, tmp_path: Path) -> None:
    """A second write copies the cached build instead of rebuilding it from the GGUF."""
    cache = cached_tokenizer_dir()
    stamp = {name: (cache / name).stat().st_mtime_ns for name in CACHED_FILES}
    names = write_tokenizer_files(tmp_path, tokens_per_image=TOKENS_PER_IMAGE, image_size=IMAGE_SIZE)
    assert {name: (cache / name).stat().st_mtime_ns for name in CACHED_FILES} == stamp
    for name in names:
        assert (tmp_path / name).read_bytes() == (checkpoint / name).read_bytes(), name
