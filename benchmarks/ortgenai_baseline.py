"""onnxruntime-genai 0.18's own int4 CPU build of a Gemma 3 checkpoint and its own generator loop: the
text-only baseline the ONNX decoder is measured against (issue 13).

Runs in a virtual environment of its own: onnxruntime-genai brings its own onnxruntime, and its
builder needs torch and transformers (benchmarks/README.md, "onnxruntime-genai baseline"). It imports
nothing from medgemma_edge.

    python benchmarks/ortgenai_baseline.py build CHECKPOINT OUT [--precision int4] [--accuracy-level 4]
    python benchmarks/ortgenai_baseline.py run OUT [--prompt-ids FILE | --prompt-len N] [--new-tokens 32]
                                           [--threads 2] [--warmup 1] [--rounds 3] [--json FILE]

`build` runs the builder's own entry point after two fixes for 0.18 under transformers 5 (found in
issue 13's research): transformers 5 reads a Gemma 3 config into nested per-layer-type
`rope_parameters`, which 0.18 indexes as a flat dict (KeyError 'rope_type'), and 0.18 applies the
global layers' linear RoPE factor to the local table as well, which transformers does not (greedy
tokens differ from the first one on MedGemma 4B's factor 8). Options: `prune_lm_head` (logits for the
last position only, as our decoder computes them), block 32, the accuracy level given. The builder
keeps only the text part of a multimodal checkpoint; the result decodes text (its attention is causal
only, so it cannot take an image span).

`run` times the generator: prefill = `append_tokens` (one forward over the prompt), decode = the 2nd..Nth
`generate_next_token` (the first only samples from the prefill logits). Greedy, batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def _patch_builder():  # -> the builder module, with Gemma3Model fixed for transformers 5
    from onnxruntime_genai.models import builder

    # the package puts its own folder on sys.path, so the CLI's classes live in `builders.gemma`
    gemma = sys.modules[builder.Gemma3Model.__module__]
    model_cls = gemma.Gemma3Model
    original_rope_init = model_cls.make_rope_init

    def make_rope_init(self, config):  # type: ignore[no-untyped-def]
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict) and "full_attention" in params:
            full = dict(params["full_attention"])
            local = dict(params.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10_000.0})
            config.rope_theta, config.rope_local_base_freq = full["rope_theta"], local["rope_theta"]
            self.rope_attrs["theta"] = full["rope_theta"]  # read before this hook, with a 10000 fallback
            self._local_rope = local
            config.rope_parameters = full  # the flat form 0.18 expects: default, or linear with its factor
        original_rope_init(self, config)

    def make_rotary_embedding_multi_cache(self):  # type: ignore[no-untyped-def]
        make = gemma.Model.make_rotary_embedding_caches
        self.cos_cache_global_name, self.sin_cache_global_name = "cos_cache_global", "sin_cache_global"
        make(self, cos_cache_name=self.cos_cache_global_name, sin_cache_name=self.sin_cache_global_name)
        self.rope_attrs["create_caches"] = True
        self.rope_attrs["theta"] = self.rope_local_theta
        local = getattr(self, "_local_rope", None)
        if local is not None and local.get("rope_type", "default") == "default":
            self.rope_attrs["rescale_factors"] = 1  # ref: transformers scales only the full-attention table
        self.cos_cache_local_name, self.sin_cache_local_name = "cos_cache_local", "sin_cache_local"
        make(self, cos_cache_name=self.cos_cache_local_name, sin_cache_name=self.sin_cache_local_name)

    model_cls.make_rope_init = make_rope_init
    model_cls.make_rotary_embedding_multi_cache = make_rotary_embedding_multi_cache
    return builder


def build(checkpoint: Path, out: Path, precision: str, accuracy_level: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    builder = _patch_builder()
    cache = out.with_name(out.name + ".cache")
    argv = ["-i", str(checkpoint), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache),
            "--extra_options", "prune_lm_head=true", f"accuracy_level={accuracy_level}", "block_size=32"]
    saved, sys.argv = sys.argv, ["builder", *argv]
    try:
        args = builder.get_args()
    finally:
        sys.argv = saved
    extra = builder.parse_extra_options(
        args.model_name, args.input, args.output, args.precision, args.execution_provider, args.cache_dir,
        args.extra_options, builder_config_version=args.builder_config_version, target_options=args.target_options,
        drafter_options=args.drafter_options, speculative_options=args.speculative_options,
        runtime_config=args.runtime_config, search=args.search)
    t0 = time.perf_counter()
    builder.create_model(args.model_name, args.input, args.output, args.precision, args.execution_provider,
                         args.cache_dir, **extra)
    return {"built": str(out), "precision": precision, "accuracy_level": accuracy_level,
            "build_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": _peak_rss_gb()}


def _peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB


def _prompt(args: argparse.Namespace) -> list[int]:
    if args.prompt_ids:
        ids = json.loads(Path(args.prompt_ids).read_text())
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids) or not ids:
            raise SystemExit(f"{args.prompt_ids}: expected a JSON list of token ids")
        return ids
    import numpy as np

    rng = np.random.default_rng(0)
    return [2, *rng.integers(1000, 200_000, args.prompt_len - 1).tolist()]  # <bos> + random text ids


def run(model_dir: Path, args: argparse.Namespace) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    config = og.Config(str(model_dir))
    config.clear_providers()  # the CPU provider
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    ids = np.asarray(_prompt(args), np.int32)

    def once() -> dict:
        params = og.GeneratorParams(model)
        # the windowed KV cache needs max_length >= sliding_window (genai refuses smaller)
        params.set_search_options(max_length=max(len(ids) + args.new_tokens, args.min_max_length), do_sample=False,
                                  batch_size=1)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        prefill = time.perf_counter() - t
        steps, tokens = [], []
        while not gen.is_done() and len(tokens) < args.new_tokens:
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
            tokens.append(int(gen.get_next_tokens()[0]))
        decode = sum(steps[1:])
        return {"prompt_tokens": len(ids), "prefill_s": prefill, "prefill_tok_s": len(ids) / prefill,
                "ttft_s": prefill + steps[0], "new_tokens": len(tokens),
                "decode_tok_s": (len(tokens) - 1) / decode if decode else None, "tokens": tokens}

    for _ in range(args.warmup):
        once()
    rounds = [once() for _ in range(args.rounds)]
    return {"baseline": "onnxruntime-genai", "version": og.__version__, "model": str(model_dir),
            "threads": args.threads, "load_s": load_s, "rounds": rounds, "peak_rss_gb": _peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the model with onnxruntime-genai's builder")
    b.add_argument("checkpoint", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--precision", default="int4", choices=["int4", "fp32"])
    b.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4])
    r = sub.add_parser("run", help="time its generator loop")
    r.add_argument("model_dir", type=Path)
    r.add_argument("--prompt-ids", type=Path, help="JSON list of token ids (the suite's prompt, tokenized)")
    r.add_argument("--prompt-len", type=int, default=284, help="random text ids when no --prompt-ids")
    r.add_argument("--new-tokens", type=int, default=32)
    r.add_argument("--min-max-length", type=int, default=1024, help="generator max_length floor (>= window)")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--rounds", type=int, default=3)
    for p in (b, r):
        p.add_argument("--json", type=Path, help="write the result here as well")
    args = parser.parse_args()
    result = build(args.checkpoint, args.out, args.precision, args.accuracy_level) if args.command == "build" \
        else run(args.model_dir, args)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
