"""The thinking splitter on scripted token streams: markers as tokens and as text split across pieces,
Google's `thought\\n` header, unclosed thoughts, stray markers; and the system instruction's placement."""

from __future__ import annotations

import pytest

from medgemma_edge.runtime.thinking import (CLOSE_TEXT, OPEN_TEXT, THINKING_INSTRUCTION, ThinkingMarkers,
                                            ThinkingSplitter, with_thinking)

pytestmark = pytest.mark.unit

OPEN, CLOSE = 100, 101  # Gemma 3's <unused94>, <unused95>
GEMMA = ThinkingMarkers(OPEN, CLOSE)
TEXT = 7  # any ordinary token: the scripts give its piece


def _run(stream: list[tuple[int, str]], markers: ThinkingMarkers = GEMMA) -> tuple[str, str, ThinkingSplitter, list]:
    """(reasoning, answer, splitter, chunks): every push's output, then the flush."""
    s = ThinkingSplitter(markers)
    chunks = [s.push(tok, text) for tok, text in stream] + [s.flush()]
    return "".join(r for r, _ in chunks), "".join(a for _, a in chunks), s, chunks


def _pieces(*texts: str) -> list[tuple[int, str]]:
    return [(TEXT, t) for t in texts]


def test_marker_tokens_split_reasoning_from_answer_as_google_does() -> None:
    # control tokens detokenize to "", so the splitter must act on their ids
    stream = [(OPEN, ""), *_pieces("thought", "\n", "Lungs ", "clear."), (CLOSE, ""), *_pieces("\n", "No ", "effusion.")]
    reasoning, answer, s, _ = _run(stream)
    # ref: quick_start_with_model_garden.ipynb: split on <unused95>, drop "<unused94>thought\n"
    whole = f"{OPEN_TEXT}thought\nLungs clear.{CLOSE_TEXT}\nNo effusion."
    thought, response = whole.split(CLOSE_TEXT)
    assert reasoning == thought.replace(f"{OPEN_TEXT}thought\n", "") == "Lungs clear."
    assert answer == response.lstrip() == "No effusion."
    assert not s.in_thought and s.thought_seen


@pytest.mark.parametrize("cut", range(1, len(OPEN_TEXT + "thought\nA" + CLOSE_TEXT + "B")))
def test_marker_text_split_anywhere_across_pieces(cut: int) -> None:
    """A model (or a checkpoint typing the markers as text) that writes the markers as pieces."""
    whole = OPEN_TEXT + "thought\nA" + CLOSE_TEXT + "B"
    reasoning, answer, _, chunks = _run(_pieces(whole[:cut], whole[cut:]))
    assert (reasoning, answer) == ("A", "B")
    assert not any("<unused" in r or "<unused" in a for r, a in chunks)


def test_marker_text_one_character_at_a_time() -> None:
    whole = "Pre " + OPEN_TEXT + "thought\nwhy" + CLOSE_TEXT + "  because"
    reasoning, answer, _, chunks = _run(_pieces(*whole))
    assert (reasoning, answer) == ("why", "Pre because")
    assert all("<unused9" not in r + a for r, a in chunks)


def test_header_split_across_pieces_and_absent_header_kept() -> None:
    assert _run([(OPEN, ""), *_pieces("tho", "ug", "ht", "\nx"), (CLOSE, ""), *_pieces("y")])[:2] == ("x", "y")
    # no "thought\n" after the marker: the thought is kept whole
    assert _run([(OPEN, ""), *_pieces("though it"), (CLOSE, ""), *_pieces("y")])[:2] == ("though it", "y")
    # a header prefix at the very end of the stream is reasoning, not lost
    assert _run([(OPEN, ""), *_pieces("thou")])[:2] == ("thou", "")


def test_unclosed_thought_is_reported() -> None:
    reasoning, answer, s, _ = _run([(OPEN, ""), *_pieces("thought\n", "still ", "thinking")])
    assert (reasoning, answer) == ("still thinking", "")
    assert s.in_thought


def test_no_thinking_passes_text_through_and_drops_stray_markers() -> None:
    reasoning, answer, s, _ = _run(_pieces("Hello ", "world") + [(CLOSE, "")] + _pieces("!"))
    assert (reasoning, answer) == ("", "Hello world!") and not s.thought_seen
    # a nested opening marker inside a thought is dropped, not shown
    reasoning, answer, _, _ = _run([(OPEN, ""), *_pieces("a"), (OPEN, ""), *_pieces("b"), (CLOSE, ""), *_pieces("c")])
    assert (reasoning, answer) == ("ab", "c")


def test_a_prefix_that_is_not_a_marker_is_released() -> None:
    # "<unu" is held back while it could be a marker, and released as soon as it cannot
    _, answer, _, chunks = _run(_pieces("a <unu", "sual b"))
    assert answer == "a <unusual b"
    assert chunks[0] == ("", "a ") and chunks[1] == ("", "<unusual b")


def test_markers_by_text_only_when_the_vocabulary_has_no_marker_tokens() -> None:
    reasoning, answer, _, _ = _run(_pieces(OPEN_TEXT, "thought\nr", CLOSE_TEXT, "a"), ThinkingMarkers())
    assert (reasoning, answer) == ("r", "a")


def test_system_instruction_placement() -> None:
    # ref: quick_start_with_model_garden.ipynb: f"SYSTEM INSTRUCTION: think silently if needed. {system_instruction}"
    assert with_thinking("You are an expert radiologist.") == (
        "SYSTEM INSTRUCTION: think silently if needed. You are an expert radiologist.")
    # ref: evaluate_on_medqa.ipynb: the bare instruction as the whole system message
    assert with_thinking(None) == with_thinking("") == THINKING_INSTRUCTION
