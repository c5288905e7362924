"""Stop sequences over streamed pieces: the answer ends right before the stop string, split anywhere."""

from __future__ import annotations

import pytest

from medgemma_edge.runtime.stops import StopMatcher, first_match, held_suffix

pytestmark = pytest.mark.unit

TEXT = "Findings: clear lungs.\n\nQuestion: next"


def _stream(pieces: list[str], stops: list[str]) -> tuple[str, StopMatcher, list[str]]:
    m = StopMatcher(stops)
    out = [m.push(p) for p in pieces] + [m.flush()]
    return "".join(out), m, out


@pytest.mark.parametrize("cut", range(1, len(TEXT)))
def test_stop_string_split_at_every_point(cut: int) -> None:
    text, m, _ = _stream([TEXT[:cut], TEXT[cut:]], ["\n\nQuestion:"])
    assert text == "Findings: clear lungs." and m.matched == "\n\nQuestion:"


def test_character_by_character_and_nothing_after_the_stop() -> None:
    text, m, out = _stream(list(TEXT) + ["more text"], ["Question"])
    assert text == "Findings: clear lungs.\n\n" and m.matched == "Question"
    assert out[-2:] == ["", ""]  # once stopped, nothing more comes out
    assert not any("Q" in piece for piece in out)


def test_earliest_stop_wins_and_a_false_start_is_released() -> None:
    text, m, _ = _stream(["lungs.", "\n", "\nQuestion:"], ["Question", "\n\n"])
    assert text == "lungs." and m.matched == "\n\n"
    text, m, out = _stream(["a Que", "ue b"], ["Question"])
    assert text == "a Queue b" and m.matched is None
    assert out[0] == "a " and out[1] == "Queue b"  # held only while it could still be the stop string


def test_no_stops_is_a_pass_through() -> None:
    assert _stream(["a", "b"], [])[2] == ["a", "b", ""]


def test_helpers() -> None:
    assert held_suffix("abc Qu", ["Question"]) == 2
    assert held_suffix("abc", ["Question"]) == 0
    assert held_suffix("xQuestion", ["Question"]) == 0  # a whole match is found, not held
    assert first_match("a\n\nQuestion", ["Question", "\n\n"]) == (1, "\n\n")
    assert first_match("abc", ["bc", "b"]) == (1, "bc")  # same start: the longer one
