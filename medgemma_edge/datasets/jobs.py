"""A job: what to load (a Target), what to do to each item (answer it, or score it), and the resume key.

The key of an item's line is the sha256 of this JSON value (keys sorted, no spaces, ASCII), so two runs skip
each other's items exactly when all of it is equal:

    {"v": 1, "task": "answer" | "score", "id": item id,
     "inputs": [sha256 of each image file's bytes, in order] | [the study digest],
     "question": the text asked (options included, as sent), "system": ..., "raw": ..., "thinking": ...,
     "reference": {"answer": ..., "options": ...} (score only: the score depends on them),
     "model": {"bundle_id": manifest sha256, "decoder": id, "decoder_sha256": ..., "encoder": id | null,
               "encoder_sha256": ...} (or {"decoder_gguf": file name, "decoder_sha256": ...}),
     "sampling": SamplingParams.to_json(), "input_options": {"dicom_frame", "dicom_context", "study"}}

The study digest is the sha256 of "relative path NUL sha256 LF" for each DICOM file of the study, sorted. A file
that cannot be read hashes as "unreadable" (its item gets an error line; once the file is fixed, its sha256
changes the key and the item runs again). Timings, threads, engine and cache settings are not in the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import regular_file_size, sha256_file
from medgemma_edge.datasets.items import Item
from medgemma_edge.datasets import scoring
from medgemma_edge.runtime.embedding_store import DEFAULT_STORE_BYTES
from medgemma_edge.runtime.generate import NOTICE, GenerationResult
from medgemma_edge.runtime.pipeline import Pipeline
from medgemma_edge.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

KEY_VERSION = 1
TASKS = ("answer", "score")


@dataclass(frozen=True)
class Target:
    """One pipeline to load: a bundle's artifacts (`decoder`, `encoder`: None = the defaults) or a decoder GGUF."""

    bundle: str | None = None
    decoder: str | None = None
    encoder: str | None = None
    decoder_gguf: str | None = None
    with_images: bool = True  # load the encoder (when the bundle has one)
    n_ctx: int = 4096
    n_threads: int | None = None
    providers: tuple[str, ...] | None = None
    verify: bool = True
    force: bool = False
    memory_limit: int | None = None
    cache_dir: str | None = None
    cache_bytes: int = DEFAULT_STORE_BYTES
    name: str | None = None  # how reports name it (default: from the artifacts or the file)

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        if self.decoder_gguf is not None:
            return Path(self.decoder_gguf).name
        return f"{self.encoder}+{self.decoder}" if self.encoder else str(self.decoder or "default")

    def identity(self) -> dict[str, Any]:
        """What the key names as the model: the bundle and the artifacts a load would choose (from the manifest)."""
        if self.decoder_gguf is not None:
            path = Path(self.decoder_gguf)
            if regular_file_size(path) is None:
                raise UserError(f"{path}: decoder GGUF not found; check the path")
            return {"decoder_gguf": path.name, "decoder_sha256": sha256_file(path)}
        from medgemma_edge.bundle import open_bundle
        from medgemma_edge.runtime.loader import choose

        if self.bundle is None:
            raise UserError("pass --bundle BUNDLE_DIR (a folder written by `medgemma-edge convert`)")
        bundle = open_bundle(self.bundle)
        dec = choose(bundle, "decoder", self.decoder)
        enc = choose(bundle, "encoder", self.encoder) if self.with_images and bundle.has_vision else None
        return {"bundle_id": bundle.manifest_sha256, "decoder": dec.id, "decoder_sha256": dec.sha256,
                "encoder": enc.id if enc else None, "encoder_sha256": enc.sha256 if enc else None}

    def load(self, expect: dict[str, Any]) -> Pipeline:
        """Load and verify (sha256 of every artifact used, on this node), refusing what differs from `expect`."""
        where = f"on {socket.gethostname()}"
        if self.decoder_gguf is not None:
            from medgemma_edge.runtime.loader import load_decoder_gguf

            found = self.identity()
            if found != expect:
                raise UserError(f"{self.decoder_gguf}: {where} this file's sha256 differs from the one the run "
                                f"started with; every node must see the same file at the same path")
            return load_decoder_gguf(self.decoder_gguf, n_ctx=self.n_ctx, n_threads=self.n_threads)
        from medgemma_edge.runtime.loader import load

        pipe = load(self.bundle, encoder=self.encoder, decoder=self.decoder, n_ctx=self.n_ctx,  # type: ignore[arg-type]
                    n_threads=self.n_threads, verify=self.verify, text_only=not self.with_images, force=self.force,
                    memory_limit=self.memory_limit, providers=list(self.providers) if self.providers else None,
                    cache_dir=self.cache_dir, cache_bytes=self.cache_bytes)
        got = {k: pipe.info.get(k) for k in expect}
        if got != expect:
            pipe.close()
            raise UserError(f"{self.bundle}: {where} the bundle differs from the one the run started with "
                            f"(manifest or artifact sha256); every node must see the same bundle at the same path")
        return pipe


@dataclass(frozen=True)
class Job:
    task: str  # "answer" (batch) | "score" (eval)
    target: Target
    model: dict[str, Any]  # target.identity(), resolved once by the driver
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    prompt: str | None = None  # the question of items that have none
    raw: bool = False  # no chat template (base models)
    thinking: bool = False
    dicom_frame: int | None = None
    dicom_context: bool = False
    study: tuple[tuple[str, Any], ...] = ()  # plan_volume keywords: max_slices, slice_order, preset, instruction

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: one of {TASKS}")

    @classmethod
    def make(cls, task: str, target: Target, **kw: Any) -> "Job":
        return cls(task, target, target.identity(), **kw)

    def with_threads(self, n: int) -> "Job":
        return self if self.target.n_threads else replace(self, target=replace(self.target, n_threads=n))

    def question(self, item: Item) -> str:
        """The text asked for `item` (before any DICOM context); for a score job, the letter prompt."""
        text = item.question if item.question is not None else self.prompt
        if text is None:
            raise UserError(f"item {item.id}: has no question; pass --prompt TEXT or give it a `question`")
        return scoring.mc_prompt(text, item.options, self.raw) if item.options else text

    def key(self, item: Item, inputs: list[str]) -> str:
        study = dict(self.study) if item.study else None
        payload = {"v": KEY_VERSION, "task": self.task, "id": item.id, "inputs": inputs,
                   "question": self._question_or_none(item), "system": self.system, "raw": self.raw,
                   "thinking": self.thinking, "model": self.model, "sampling": self.sampling.to_json(),
                   "reference": {"answer": item.answer, "options": item.options} if self.task == "score" else None,
                   "input_options": {"dicom_frame": self.dicom_frame, "dicom_context": self.dicom_context,
                                     "study": study}}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def _question_or_none(self, item: Item) -> str | None:
        try:
            return self.question(item)
        except UserError:
            return None  # the item's line will say so


def input_hashes(item: Item) -> list[str]:
    """sha256 of each input as stored (see the module docstring), without decoding anything."""
    if item.study is not None:
        return [study_digest(Path(item.study))]
    return [_file_sha256(Path(p)) for p in item.images]


def _file_sha256(path: Path) -> str:
    if regular_file_size(path) is None:  # missing, a folder, a pipe: never opened (a FIFO would block)
        return "unreadable"
    try:
        return sha256_file(path)
    except OSError:
        return "unreadable"


def study_digest(path: Path) -> str:
    from medgemma_edge.inputs.studies import dicom_files

    try:
        files = dicom_files(path)
    except UserError:
        return "unreadable"
    h = hashlib.sha256()
    for f in sorted(files):
        rel = f.relative_to(path).as_posix() if f != path else f.name
        h.update(f"{rel}\0{_file_sha256(f)}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


# -- running one item -----------------------------------------------------------------------------
def run_item(pipe: Pipeline, job: Job, item: Item, key: str, inputs: list[str]) -> dict[str, Any]:
    """The item's line: "ok" with its answer or scores, or "error" with a one-line reason. Never raises a
    UserError (or any other Exception): a bad item must not stop a cohort."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"id": item.id, "key": key, "task": job.task, "status": "ok", "inputs_sha256": inputs,
                              "model": job.model, "sampling": job.sampling.to_json(), "host": socket.gethostname()}
    if item.line is not None:
        record["line"] = item.line
    try:
        record.update(_answer(pipe, job, item) if job.task == "answer" else _score(pipe, job, item))
    except UserError as exc:
        record.update(status="error", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a defect shows on its item's line; the cohort goes on
        log.debug("item %s failed", item.id, exc_info=True)
        record.update(status="error", error=f"internal error ({type(exc).__name__}: {exc})")
    record["item_s"] = round(time.perf_counter() - t0, 4)
    return record


def _images(job: Job, item: Item) -> list[Any]:
    from medgemma_edge.inputs.files import prepare_images

    return prepare_images([Path(p) for p in item.images], job.dicom_frame)


def _asked(job: Job, item: Item, text: str) -> str:
    from medgemma_edge.inputs.files import with_dicom_context

    return with_dicom_context(text, [Path(p) for p in item.images]) if job.dicom_context else text


def _generate(pipe: Pipeline, job: Job, item: Item, text: str) -> tuple[GenerationResult, dict[str, Any]]:
    from medgemma_edge.runtime.generate import generate

    if item.study is not None:
        from medgemma_edge.runtime.studies import ask_turn, plan_volume
        from medgemma_edge.runtime.thinking import thinking_system

        turn = plan_volume(Path(item.study), text, dicom_context=job.dicom_context, **dict(job.study))
        system = thinking_system(pipe.tokenizer, job.system, item.study) if job.thinking else job.system
        return (ask_turn(pipe, turn, system, job.sampling, thinking=job.thinking),
                {"study": turn.info, "prompt": turn.question})
    asked = _asked(job, item, text)
    result = generate(pipe, asked, _images(job, item), system=job.system, sampling=job.sampling, raw=job.raw,
                      thinking=job.thinking)
    return result, {"prompt": asked}


def _answer_fields(result: GenerationResult, prompt: str, system: str | None) -> dict[str, Any]:
    digest = hashlib.sha256(f"{system or ''}\x00{prompt}".encode("utf-8", "surrogatepass")).hexdigest()
    return {"answer": result.text, "reasoning": result.reasoning, "stop_reason": result.stop_reason,
            "prompt_sha256": digest,
            "tokens": {"prompt": result.prompt_tokens, "image": result.image_tokens,
                       "generated": len(result.token_ids), "reused": result.reused_tokens},
            "timings": {k: round(v, 3) for k, v in result.timings.items()}, "notice": NOTICE}


def _answer(pipe: Pipeline, job: Job, item: Item) -> dict[str, Any]:
    result, extra = _generate(pipe, job, item, job.question(item))
    out = _answer_fields(result, extra.pop("prompt"), job.system) | extra
    if item.answer is not None:
        out["reference"] = item.answer
        if item.options:
            out["letter"] = scoring.extract_letter(result.text, item.letters, item.options)
            out["correct"] = out["letter"] == item.answer
        else:
            out["exact_match"] = scoring.exact_match(result.text, item.answer)
            out["normalised_match"] = scoring.normalised_match(result.text, item.answer)
    return out


def _score(pipe: Pipeline, job: Job, item: Item) -> dict[str, Any]:
    if item.study is not None:
        raise UserError(f"item {item.id}: eval scores images and text; a study folder is answered by `batch`")
    if item.answer is None:
        raise UserError(f"item {item.id}: nothing to score: give it an `answer` (and `options` for multiple choice)")
    if not item.options:  # free text: generate, then compare
        result, extra = _generate(pipe, job, item, job.question(item))
        return {**_answer_fields(result, extra["prompt"], job.system), "reference": item.answer,
                "exact_match": scoring.exact_match(result.text, item.answer),
                "normalised_match": scoring.normalised_match(result.text, item.answer)}
    text = item.question if item.question is not None else job.prompt
    assert text is not None  # job.question() below refuses it first otherwise
    letter_prompt = job.question(item)
    images = _images(job, item)
    cloze = _asked(job, item, scoring.cloze_prompt(text, job.raw))
    t0 = time.perf_counter()
    lls = scoring.option_logliks(pipe, cloze, [scoring.cloze_answer(t, job.raw) for _, t in item.options], images,
                                 job.system, job.raw)
    loglik_s = time.perf_counter() - t0
    pred_ll = scoring.best([s for s, _ in lls], item.letters)
    result, extra = _generate(pipe, job, item, letter_prompt)
    pred_gen = scoring.extract_letter(result.text, item.letters, item.options)
    out = _answer_fields(result, extra["prompt"], job.system)
    out["timings"]["loglik_s"] = round(loglik_s, 3)
    return {**out, "reference": item.answer, "scores": {letter: s for letter, (s, _) in zip(item.letters, lls)},
            "option_tokens": {letter: n for letter, (_, n) in zip(item.letters, lls)},
            "pred_loglik": pred_ll, "pred_generated": pred_gen,
            "correct_loglik": pred_ll == item.answer, "correct_generated": pred_gen == item.answer}
