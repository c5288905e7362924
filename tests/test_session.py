"""Chat sessions: a follow-up about the same image re-encodes nothing, prefills only the new turn,
and answers exactly as a fresh session given the same conversation would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import medgemma_edge
from medgemma_edge import ChatSession, SamplingParams

CLI = str(Path(sys.executable).with_name("medgemma-edge"))
SYSTEM = "You are an expert radiologist."


def _pipe(bundle: Path, decoder: str = "gguf:f32"):
    return medgemma_edge.load(bundle, encoder="gguf:f32", decoder=decoder)


@pytest.mark.parametrize("decoder", ["gguf:f32", "onnx:fp32"])
def test_follow_up_reuses_image_and_prefix(tiny_bundle: Path, xray_png: Path, decoder: str) -> None:
    pipe = _pipe(tiny_bundle, decoder)
    session = ChatSession(pipe, system=SYSTEM)
    first = session.ask("Describe this X-ray", images=[xray_png], sampling=SamplingParams(max_new_tokens=8))
    assert pipe.encoder_calls == 1 and first.reused_tokens == 0
    second = session.ask("Is there a pleural effusion?", sampling=SamplingParams(max_new_tokens=8))
    assert pipe.encoder_calls == 1  # zero encoder calls for the follow-up
    # everything up to the new turn came from the KV cache: the first prompt and the evaluated answer
    assert second.reused_tokens >= first.prompt_tokens + len(first.token_ids) - 1

    fresh_pipe = _pipe(tiny_bundle, decoder)
    fresh = ChatSession(fresh_pipe, system=SYSTEM)
    fresh.turns, fresh.images = list(session.turns[:2]), [xray_png]  # same conversation, nothing cached
    again = fresh.ask("Is there a pleural effusion?", sampling=SamplingParams(max_new_tokens=8))
    assert again.reused_tokens == 0 and fresh_pipe.encoder_calls == 1
    assert again.token_ids == second.token_ids and again.prompt_tokens == second.prompt_tokens


def test_same_image_twice_in_one_session_is_encoded_once(tiny_bundle: Path, xray_png: Path, tmp_path: Path) -> None:
    copy = tmp_path / "same-pixels.png"
    copy.write_bytes(xray_png.read_bytes())
    pipe = _pipe(tiny_bundle)
    session = ChatSession(pipe)
    session.ask("First look", images=[xray_png], sampling=SamplingParams(max_new_tokens=2))
    session.ask("Compare with this one", images=[copy], sampling=SamplingParams(max_new_tokens=2))
    assert pipe.encoder_calls == 1  # keyed by pixel content and encoder artifact, not by path


def test_reset_forgets_the_conversation(tiny_bundle: Path, xray_png: Path) -> None:
    pipe = _pipe(tiny_bundle)
    session = ChatSession(pipe, system=SYSTEM)
    session.ask("Describe this X-ray", images=[xray_png], sampling=SamplingParams(max_new_tokens=4))
    session.reset()
    alone = session.ask("Hello", sampling=SamplingParams(max_new_tokens=4))
    assert alone.image_tokens == 0 and session.turns[0].text == "Hello"
    assert alone.token_ids == medgemma_edge.generate(_pipe(tiny_bundle), "Hello", system=SYSTEM, sampling=SamplingParams(max_new_tokens=4)).token_ids


def test_chat_cli(tiny_bundle: Path, xray_png: Path) -> None:
    script = "Describe this X-ray\n/image /no/such/file.png\nAny effusion?\n/reset\nHello\n"
    out = subprocess.run([CLI, "-v", "chat", "--bundle", str(tiny_bundle), "--image", str(xray_png),
                          "--max-new-tokens", "4", "--decoder", "gguf:q8_0"],
                         input=script, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "/no/such/file.png: image file not found" in out.stderr  # a typo does not end the session
    assert "[new conversation]" in out.stderr
    reuse = [line for line in out.stderr.splitlines() if "tokens reused" in line]
    assert len(reuse) == 3 and "(0 tokens reused)" in reuse[0] and "(0 tokens reused)" not in reuse[1]


def test_a_failed_turn_leaves_the_session_as_it_was(tiny_bundle: Path, xray_png: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(xray_png.read_bytes()[:200])  # a truncated PNG
    pipe = _pipe(tiny_bundle)
    session = ChatSession(pipe, system=SYSTEM)
    session.ask("Describe this X-ray", images=[xray_png], sampling=SamplingParams(max_new_tokens=4))
    with pytest.raises(medgemma_edge.UserError, match="broken.png"):
        session.ask("And this one?", images=[broken], sampling=SamplingParams(max_new_tokens=4))
    assert len(session.turns) == 2 and session.images == [xray_png]
    follow_up = session.ask("Any effusion?", sampling=SamplingParams(max_new_tokens=4))
    assert follow_up.reused_tokens > 0 and len(session.turns) == 4
