"""One measured run of one combination, in a fresh process: its load time and peak RSS are its own.

`python -m medgemma_edge.measure.worker SPEC_JSON` prints one line `BENCH_RESULT {json}`. The same
scenario runs for every kind: load, ask one question about the images (fixed number of new tokens,
EOS ignored), then a follow-up question about the same images.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "


class CpuWatch:
    """CPU time other processes used while we measured, in cores: on a shared machine this, not the
    spread of our own figures, is what flags a disturbed run."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None  # not Linux
        own = os.times()
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        return busy, own.user + own.system, time.perf_counter()

    def other_cores(self) -> float | None:
        end = self._sample()
        if end is None or self._start is None:
            return None
        (b0, o0, t0), (b1, o1, t1) = self._start, end
        return round(max((b1 - b0) - (o1 - o0), 0.0) / max(t1 - t0, 1e-9), 2)


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS reports bytes, Linux KiB


def _pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    from medgemma_edge.runtime.chat import ChatSession
    from medgemma_edge.runtime.loader import load
    from medgemma_edge.runtime.sampling import SamplingParams

    t0 = time.perf_counter()
    pipe = load(spec["bundle"], encoder=spec["encoder"], decoder=spec["decoder"], n_ctx=spec["n_ctx"],
                n_threads=spec["threads"], verify=False,  # the parent verified every artifact once
                encode_batch=spec.get("encode_batch"))
    load_s = time.perf_counter() - t0
    session = ChatSession(pipe, system=spec["system"])
    first = session.ask(spec["prompt"], images=spec["images"], content=_content(spec),
                        sampling=SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True))
    calls = pipe.encoder_calls
    follow = session.ask(spec["followup"], sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert pipe.encoder_calls == calls, "a follow-up question re-encoded an image"
    t, f = first.timings, follow.timings
    return {"load_s": load_s, "image_encode_ms": t["image_encode_ms"],
            "prefill_image_tokens_per_s": t.get("prefill_image_tokens_per_s"),
            "prefill_text_tokens_per_s": t.get("prefill_text_tokens_per_s"),
            "ttft_ms": t["time_to_first_token_ms"], "decode_tokens_per_s": t["decode_tokens_per_s"],
            "followup_ttft_ms": f["time_to_first_token_ms"], "image_tokens": first.image_tokens,
            "prompt_tokens": first.prompt_tokens, "tokens": first.token_ids[:8]}


def _llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    from medgemma_edge.measure.baseline_llama import LlamaCppBaseline, mtmd_prompt
    from medgemma_edge.bundle import open_bundle
    from medgemma_edge.inputs.images import resize_square
    from medgemma_edge.runtime.study_prompt import user_turn
    from medgemma_edge.runtime.template import render_conversation, render_prompt

    bundle = open_bundle(spec["bundle"])
    size = int(bundle.config["vision"]["image_size"])
    t0 = time.perf_counter()
    base = LlamaCppBaseline(bundle.path(bundle.find("decoder", spec["decoder"])),
                            bundle.path(bundle.find("encoder", spec["encoder"])), spec["n_ctx"], spec["threads"])
    load_s = time.perf_counter() - t0
    content = _content(spec)
    text = mtmd_prompt(render_conversation([user_turn(content)], spec["system"]) if content is not None
                       else render_prompt(spec["prompt"], len(spec["images"]), spec["system"]))
    t0 = time.perf_counter()
    pixels = [resize_square(p, size) for p in spec["images"]]
    t_pre = time.perf_counter() - t0  # counted as encode time, as our pipeline's image stage includes it
    tally = base.prefill(text, pixels)
    tokens = [base.next_token()]
    t_first = time.perf_counter()
    for _ in range(spec["new_tokens"] - 1):  # EOS ignored: a fixed amount of work for every combination
        base.feed(tokens[-1])
        tokens.append(base.next_token())
    decode_s = time.perf_counter() - t_first
    base.feed(tokens[-1])
    t1 = time.perf_counter()
    base.prefill(f"<end_of_turn>\n<start_of_turn>user\n{spec['followup']}<end_of_turn>\n<start_of_turn>model\n")
    base.next_token()
    followup_ms = (time.perf_counter() - t1) * 1e3
    base.close()
    rate = {k: tally[f"{k}_n"] / tally[f"{k}_s"] if tally[f"{k}_s"] else None for k in ("image", "text")}
    return {"load_s": load_s, "image_encode_ms": (t_pre + tally["encode_s"]) * 1e3,
            "prefill_image_tokens_per_s": rate["image"], "prefill_text_tokens_per_s": rate["text"],
            "ttft_ms": (t_first - t0) * 1e3, "decode_tokens_per_s": (len(tokens) - 1) / decode_s if decode_s else 0.0,
            "followup_ttft_ms": followup_ms, "image_tokens": tally["image_n"],
            "prompt_tokens": tally["image_n"] + tally["text_n"], "tokens": tokens[:8]}


def _content(spec: dict[str, Any]) -> Any:
    """The notebook's volume prompt when the images are a study's slices (bench --study), else None."""
    if not spec.get("volume"):
        return None
    from medgemma_edge.runtime.study_prompt import volume_content

    return volume_content(spec["prompt"], len(spec["images"]))


def run(spec: dict[str, Any]) -> dict[str, Any]:
    watch = CpuWatch()
    result = (_llama_cpp if spec["kind"] == "llama.cpp" else _pipeline)(spec)
    return {**result, "peak_rss_mb": peak_rss_mb(), "other_cores": watch.other_cores()}


def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(sys.argv[1])
    print(RESULT_PREFIX + json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main()
