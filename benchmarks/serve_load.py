"""`medgemma-edge serve` under load, against the library in-process, on the machine at hand.

    .venv/bin/python benchmarks/serve_load.py --bundle BUNDLE [--image cxr.png] [--out benchmarks/results/DIR]

Measures, with the same request (an image and a question, greedy, a fixed number of tokens):
1. time to first token in-process (`stream_generate`) and through the server (HTTP, base64, JSON, SSE: the
   client's clock from sending the request to the first content chunk), each with a cold image cache
   (every repetition has its own pixels);
2. a follow-up question about the same image: in-process `ChatSession` vs a new server request carrying the
   conversation (the server must encode nothing and prefill only the new turn);
3. throughput (requests/s, generated tokens/s) and p50/p99 TTFT for 1, 2, 4, 8 concurrent clients, each
   sending --requests questions about images of its own, with --parallel 1 and 2.
Each server is a fresh process. The CPU other processes used during each part is recorded: figures taken
while the machine was busy say so. Results: serve-load.json and serve-load.md in --out.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLI = Path(sys.executable).with_name("medgemma-edge")
QUESTION = "Describe the findings in this image."


def question(i: int) -> str:
    """Its own first words each time: a server slot then shares only the template's 4 tokens with it, as a
    cleared in-process cache shares none (the prefill compared is the same)."""
    return f"Case {i}. {QUESTION}"
FOLLOW_UP = "Is the heart size normal?"


# -- what the machine did meanwhile ----------------------------------------------------------------------
def _busy_jiffies() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


def _proc_jiffies(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


class CpuWatch:
    """Cores used by other processes while a part ran (ours: this process and the server)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.hz = pids, os.sysconf("SC_CLK_TCK")
        self.t0, self.busy0 = time.monotonic(), _busy_jiffies()
        self.ours0 = sum(_proc_jiffies(p) for p in [os.getpid(), *pids])

    def other_cores(self) -> float:
        ours = sum(_proc_jiffies(p) for p in [os.getpid(), *self.pids]) - self.ours0
        return max(0.0, (_busy_jiffies() - self.busy0 - ours) / self.hz / (time.monotonic() - self.t0))


# -- inputs ----------------------------------------------------------------------------------------------
def image_variant(base: Image.Image, i: int) -> Image.Image:
    """The base image with one pixel changed: other pixels, so neither side's image cache can answer."""
    a = np.asarray(base.convert("RGB")).copy()
    a[i // a.shape[1] % a.shape[0], i % a.shape[1]] ^= np.uint8(1 + i % 255)
    return Image.fromarray(a)


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def default_image(size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((xx - 0.33) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + np.exp(-(((xx - 0.67) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    noise = np.random.default_rng(1).normal(0, 0.05, (size, size))
    gray = np.clip(200 - 150 * lungs + 255 * noise, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, -1))


# -- the server ------------------------------------------------------------------------------------------
class Server:
    def __init__(self, args: argparse.Namespace, parallel: int) -> None:
        cmd = [str(CLI), "serve", "--bundle", str(args.bundle), "--port", "0", "--parallel", str(parallel),
               "--max-queue", "64", "--ctx", str(args.ctx), "--request-timeout", "3600"]
        cmd += [x for k in ("encoder", "decoder", "threads") if getattr(args, k) for x in (f"--{k}", str(getattr(args, k)))]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.url, lines = "", []
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit("the server stopped:\n" + "".join(lines))
            lines.append(line)
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m.group(1)
            if "ready:" in line:
                break
        threading.Thread(target=lambda: self.proc.stderr.read(), daemon=True).start()  # never let the pipe fill

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stream_request(url: str, messages: list[dict], max_tokens: int) -> dict[str, Any]:
    """One streamed request: client-side TTFT (to the first content chunk), total time, text, usage."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    end = time.perf_counter()
    return {"ttft_s": (first or end) - t0, "total_s": end - t0, "text": "".join(text),
            "completion_tokens": usage.completion_tokens if usage else 0,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens if usage else 0}


def user(text: str, url: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


# -- the parts -------------------------------------------------------------------------------------------
def in_process(args: argparse.Namespace, base: Image.Image) -> dict[str, Any]:
    import medgemma_edge
    from medgemma_edge import ChatSession, SamplingParams

    sampling = SamplingParams(max_new_tokens=args.max_tokens)
    pipe = medgemma_edge.load(args.bundle, encoder=args.encoder, decoder=args.decoder, n_ctx=args.ctx,
                              n_threads=args.threads)
    watch = CpuWatch([])
    ttft, follow = [], []
    try:
        for rep in range(args.warmup + args.reps):
            img = image_variant(base, 1000 + rep)
            t0 = time.perf_counter()
            first = None
            for chunk in medgemma_edge.stream_generate(pipe, question(1000 + rep), [img], sampling=sampling):
                first = first or time.perf_counter()
            session = ChatSession(pipe)
            session.ask(question(2000 + rep), [image_variant(base, 2000 + rep)], sampling)
            t1 = time.perf_counter()
            chunks = session.stream_ask(FOLLOW_UP, sampling=sampling)
            next(chunks)
            t_follow = time.perf_counter() - t1
            for _ in chunks:
                pass
            if rep >= args.warmup:
                ttft.append((first or time.perf_counter()) - t0)
                follow.append(t_follow)
    finally:
        pipe.close()
    return {"ttft_s": ttft, "follow_up_ttft_s": follow, "other_cores": watch.other_cores()}


def through_server(args: argparse.Namespace, base: Image.Image) -> dict[str, Any]:
    server = Server(args, 1)
    watch = CpuWatch([server.proc.pid])
    ttft, follow, cached = [], [], []
    try:
        for rep in range(args.warmup + args.reps):
            r = stream_request(server.url, [user(question(1000 + rep), png_data_url(image_variant(base, 1000 + rep)))],
                               args.max_tokens)
            url2 = png_data_url(image_variant(base, 2000 + rep))
            first = stream_request(server.url, [user(question(2000 + rep), url2)], args.max_tokens)
            again = stream_request(server.url, [user(question(2000 + rep), url2), {"role": "assistant", "content": first["text"]},
                                                {"role": "user", "content": FOLLOW_UP}], args.max_tokens)
            if rep >= args.warmup:
                ttft.append(r["ttft_s"])
                follow.append(again["ttft_s"])
                cached.append(again["cached_tokens"])
    finally:
        other = watch.other_cores()
        server.stop()
    return {"ttft_s": ttft, "follow_up_ttft_s": follow, "follow_up_cached_tokens": cached, "other_cores": other}


def load_run(args: argparse.Namespace, base: Image.Image, parallel: int) -> list[dict[str, Any]]:
    server = Server(args, parallel)
    rows = []
    try:
        stream_request(server.url, [user(question(1), png_data_url(image_variant(base, 1)))], args.max_tokens)  # warm-up
        for n_clients in args.clients:
            results: list[dict[str, Any]] = []
            lock = threading.Lock()

            def client(c: int) -> None:
                for j in range(args.requests):
                    i = 10_000 * n_clients + 100 * c + j
                    img = image_variant(base, i)  # its own pixels: encoded
                    r = stream_request(server.url, [user(question(i), png_data_url(img))], args.max_tokens)
                    with lock:
                        results.append(r)

            watch = CpuWatch([server.proc.pid])
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            ttfts = sorted(r["ttft_s"] for r in results)
            rows.append({"parallel": parallel, "clients": n_clients, "requests": len(results), "wall_s": wall,
                         "requests_per_s": len(results) / wall,
                         "tokens_per_s": sum(r["completion_tokens"] for r in results) / wall,
                         "ttft_p50_s": float(np.percentile(ttfts, 50)), "ttft_p99_s": float(np.percentile(ttfts, 99)),
                         "other_cores": watch.other_cores()})
            print(f"parallel {parallel}, {n_clients} clients: {rows[-1]['requests_per_s']:.3f} req/s, TTFT p50 "
                  f"{rows[-1]['ttft_p50_s']:.2f} s p99 {rows[-1]['ttft_p99_s']:.2f} s", file=sys.stderr)
    finally:
        server.stop()
    return rows


def report(res: dict[str, Any]) -> str:
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    ip, sv = res["in_process"], res["server"]
    lines = [f"# serve under load: {res['bundle']}", "",
             f"{res['machine']}; decoder {res['decoder'] or 'default'}, encoder {res['encoder'] or 'default'}; "
             f"{res['max_tokens']} tokens per answer, greedy; image {res['image_size']} px; "
             f"{res['reps']} measured repetitions after {res['warmup']} warm-up.", "",
             "| | in-process | server | ratio |", "|---|---|---|---|",
             f"| TTFT, cold image (s) | {mean(ip['ttft_s']):.3f} | {mean(sv['ttft_s']):.3f} | "
             f"{mean(sv['ttft_s']) / mean(ip['ttft_s']):.3f} |",
             f"| follow-up TTFT (s) | {mean(ip['follow_up_ttft_s']):.3f} | {mean(sv['follow_up_ttft_s']):.3f} | "
             f"{mean(sv['follow_up_ttft_s']) / mean(ip['follow_up_ttft_s']):.3f} |", "",
             f"Other processes used {ip['other_cores']:.2f} cores (in-process part) and {sv['other_cores']:.2f} "
             f"(server part). Follow-up prompt positions reused by the server: {sv['follow_up_cached_tokens']}.", "",
             "| --parallel | clients | requests | req/s | tokens/s | TTFT p50 s | TTFT p99 s | other cores |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["load"]:
        lines.append(f"| {r['parallel']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.3f} | "
                     f"{r['tokens_per_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['other_cores']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--encoder")
    ap.add_argument("--decoder")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--image", type=Path, help="an image file (default: a generated chest-film-like square)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--parallel", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--requests", type=int, default=2, help="requests per client in the load part")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve-load")
    args = ap.parse_args()
    from medgemma_edge.bundle import open_bundle
    from medgemma_edge.measure.hardware import fingerprint

    size = int(open_bundle(args.bundle).config["vision"]["image_size"])
    base = Image.open(args.image).convert("RGB") if args.image else default_image(size)
    res: dict[str, Any] = {"bundle": str(args.bundle), "encoder": args.encoder, "decoder": args.decoder,
                           "max_tokens": args.max_tokens, "reps": args.reps, "warmup": args.warmup,
                           "image_size": list(base.size), "machine": _machine(fingerprint)}
    res["in_process"] = in_process(args, base)
    res["server"] = through_server(args, base)
    res["load"] = [row for p in args.parallel for row in load_run(args, base, p)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve-load.json").write_text(json.dumps(res, indent=2))
    (args.out / "serve-load.md").write_text(report(res))
    print(report(res))


def _machine(fingerprint: Any) -> str:
    cpu = fingerprint().get("cpu") or {}
    return f"{cpu.get('model') or 'CPU'}, {cpu.get('logical_cores') or os.cpu_count()} logical cores"


if __name__ == "__main__":
    main()
