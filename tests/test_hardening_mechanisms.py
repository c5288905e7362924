"""The mechanisms that keep a defect of each kind from landing again (issue 10):
- every numeric option of every command has a finite range declared where the option is, and random values
  give exit 0 or a one-line error, never an internal error or a signal;
- every size a user controls is bounded before allocation: the worst allowed values run under a 2.5 GiB
  address-space limit;
- everything that reaches a native library is checked first: headers mutated with the manifest's hashes
  updated never abort the process;
- prompts and chat input of any content (unicode, control tokens, invalid UTF-8) are handled as text.
Campaign length: MEDGEMMA_FUZZ_EXAMPLES (default small, for CI); run longer by hand."""

from __future__ import annotations

import io
import math
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from helpers import assert_one_line_error, cli_command, run_cli, tampered_copy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medgemma_edge.cli import cli, main
from medgemma_edge.cli.options import Finite

EXAMPLES = int(os.environ.get("MEDGEMMA_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _numeric_options() -> list[tuple[str, click.Option]]:
    return [(name, p) for name, cmd in sorted(cli.commands.items()) for p in cmd.params
            if isinstance(p, click.Option) and isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))]


def test_every_numeric_option_has_a_finite_range() -> None:
    options = _numeric_options()
    assert len(options) >= 15, options  # the walk really found the options
    for name, p in options:
        t = p.type
        assert isinstance(t, (click.IntRange, click.FloatRange)), (name, p.name, t)  # no bare int/float
        assert t.min is not None and t.max is not None, (name, p.name)
        assert isinstance(t, click.IntRange) or isinstance(t, Finite), (name, p.name)  # nan-proof floats
        assert all(math.isfinite(x) for x in (t.min, t.max)), (name, p.name)


_VALUES = st.one_of(st.integers(-(2**70), 2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["nan", "inf", "-inf", "", " ", "1e309", "0x10", "--", "1_000"]),
                    st.text(max_size=12))


@FUZZ
@given(data=st.data())
def test_option_types_accept_exactly_their_range(data: st.DataObject) -> None:
    """Every numeric option's type, at the click layer: in range and finite -> accepted, else BadParameter."""
    name, p = data.draw(st.sampled_from(_numeric_options()))
    raw = data.draw(_VALUES)
    try:
        value = p.type.convert(raw, p, None)
    except click.BadParameter:
        return
    assert math.isfinite(value) and p.type.min <= value <= p.type.max, (name, p.name, raw, value)


def _in_process(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                stdin: bytes = b"") -> tuple[int, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    return code, err


@FUZZ
@given(data=st.data())
def test_run_render_and_chat_options_end_in_an_answer_or_one_line(data: st.DataObject, tiny_bundle: Path,
                                                                  xray_png: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    command = data.draw(st.sampled_from(["run", "chat", "render"]))
    options = [p for n, p in _numeric_options() if n == command]
    p = data.draw(st.sampled_from(options))
    raw = data.draw(_VALUES)
    flag = p.opts[0]
    if command == "render":
        argv = ["render", str(xray_png), "-o", str(tmp_path / "o.png"), flag, raw]
    else:
        # bounded work for in-range values: few tokens, and a small context when the token count is the option
        base = ["--bundle", str(tiny_bundle), "--decoder", "gguf:q8_0", "--no-verify"]
        base += ["--ctx", "96"] if flag == "--max-new-tokens" else ["--max-new-tokens", "2"]
        argv = [command, *base, flag, raw] + (["Hi"] if command == "run" else [])
    code, err = _in_process(argv, capsys, monkeypatch, b"Hi\n")
    assert code != 1 and "internal error" not in err and "Traceback" not in err, (argv, code, err)
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("WARNING")]
    if code:
        assert len(lines) == 1 and lines[0].startswith("error:") and ".;" not in lines[0], (argv, err)


# -- sizes: the worst allowed values under an address-space limit ------------------------------------------------
LIMIT = int(2.5 * 2**30)


def _limited(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    return subprocess.run(cli_command(*args), preexec_fn=limit, input=stdin, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def largest_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "largest.png"
    Image.fromarray(np.zeros((8192, 8192), np.uint8)).save(path)  # the largest size accepted: 8192 x 8192
    return path


def test_worst_allowed_sizes_fit_in_the_bound(tiny_bundle: Path, largest_image: Path, tmp_path: Path) -> None:
    ok = _limited("render", largest_image, "-o", tmp_path / "o.png", "--size", "8192")
    assert ok.returncode == 0, ok.stderr
    ran = _limited("run", "--bundle", tiny_bundle, "--image", largest_image, "--max-new-tokens", "2", "Hi")
    assert ran.returncode == 0, ran.stderr
    longest = "a " * ((64 * 4096 - 64) // 2)  # about the most bytes a 4096-token context is tokenized for
    chat = _limited("chat", "--bundle", tiny_bundle, "--max-new-tokens", "2",
                    stdin=longest + "\n" + longest + "a" * 200 + "\nHi\n")  # just under the byte bound, over it
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "error: the prompt needs" in chat.stderr and "error: the prompt is" in chat.stderr, chat.stderr[-2000:]
    assert chat.stdout.strip(), "the session went on to answer the last question"
    many = [arg for _ in range(300) for arg in ("--image", str(largest_image))]  # 300 x 16 tokens > 4096
    assert "images need" in assert_one_line_error(_limited("run", "--bundle", tiny_bundle, *many, "Hi"))
    biggest_ctx = _limited("run", "--bundle", tiny_bundle, "--ctx", "131072", "--max-new-tokens", "2", "Hi")
    assert biggest_ctx.returncode in (0, 2) and "Traceback" not in biggest_ctx.stderr, biggest_ctx.stderr


# -- native libraries: mutated headers with the manifest's hashes updated ---------------------------------------
def _mutate_gguf(path: Path, rng: random.Random) -> str:
    """Overwrite one numeric metadata value or one tensor dimension with a hostile number."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    hostile = [0, 1, 2, 3, 7, 255, 2**15, 2**31 - 1, 2**32 - 1]
    numeric = [f for f in reader.fields.values()
               if len(f.types) == 1 and f.types[0] not in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY)]
    if rng.random() < 0.6 and numeric:
        field = rng.choice(numeric)
        part = field.parts[-1]
        value = rng.choice(hostile) if part.dtype.kind in "ui" else rng.choice([0.0, -1.0, 1e30, float("nan")])
        part[0] = np.array(value).astype(part.dtype, casting="unsafe")
        what = f"{field.name}={value}"
    else:
        tensor = rng.choice(reader.tensors)
        dims = tensor.field.parts[3]  # the tensor info's dimension array
        k = rng.randrange(len(dims))
        dims[k] = rng.choice(hostile)
        what = f"{tensor.name} dim {k}={dims[k]}"
    reader.data.flush()
    return what


def _mutate_bytes(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    spots = [rng.randrange(len(data)) for _ in range(rng.randint(1, 8))]
    for i in spots:
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return f"bytes {spots}"


NATIVE = [("encoder", "gguf:f16", _mutate_gguf), ("decoder", "gguf:q8_0", _mutate_gguf),
          ("encoder", "onnx:int8", _mutate_bytes), ("decoder", "onnx:int4", _mutate_bytes)]


@pytest.mark.parametrize("case", range(EXAMPLES))
def test_mutated_native_headers_never_abort(tiny_bundle: Path, xray_png: Path, tmp_path: Path, case: int) -> None:
    rng = random.Random(case)
    kind, artifact, mutate = NATIVE[case % len(NATIVE)]
    what: list[str] = []
    bundle, victim = tampered_copy(tiny_bundle, tmp_path / "b", kind, artifact, lambda p: what.append(mutate(p, rng)))
    other = {"encoder": ("--decoder", "gguf:q8_0"), "decoder": ("--encoder", "gguf:f16")}[kind]
    res = run_cli("run", "--bundle", bundle, f"--{kind}", artifact, *other, "--image", xray_png,
                  "--max-new-tokens", "2", "Describe", timeout=300)
    assert res.returncode >= 0 and res.returncode not in (1, 134, 139), (what, res.returncode, res.stderr[-2000:])
    if res.returncode:
        assert_one_line_error(res)


# -- text: anything typed is data ------------------------------------------------------------------------------
_TEXT = st.one_of(st.text(max_size=80),
                  st.lists(st.sampled_from(["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                                            "<image_soft_token>", "<bos>", "<eos>", "<unused94>", "\n", "model", "user",
                                            "é", "🩻", "\x00", "\u202e", "\ufeff", "  "]), max_size=12).map("".join))


@FUZZ
@given(text=_TEXT)
def test_any_prompt_is_text(text: str, tiny_bundle: Path) -> None:
    from medgemma_edge.runtime.template import BOS_ID, END_OF_TURN_ID, START_OF_TURN_ID

    pipe = _pipe(tiny_bundle)
    ids = pipe.atoms(pipe.parts(text, 0, None, False), [])
    controls = [i for i in ids if i in (BOS_ID, 1, START_OF_TURN_ID, END_OF_TURN_ID, 255999, 256000, 262144)]
    assert controls == [BOS_ID, START_OF_TURN_ID, END_OF_TURN_ID, START_OF_TURN_ID], (text, ids)


_PIPES: dict[Path, object] = {}


def _pipe(bundle: Path):
    import medgemma_edge

    if bundle not in _PIPES:
        _PIPES[bundle] = medgemma_edge.load(bundle, decoder="gguf:q8_0", text_only=True, verify=False)
    return _PIPES[bundle]


@FUZZ
@given(lines=st.lists(st.one_of(st.binary(max_size=40), _TEXT.map(lambda t: t.encode("utf-8"))), min_size=1, max_size=4))
def test_chat_stdin_of_any_bytes(lines: list[bytes], tiny_bundle: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n"
    code, err = _in_process(["chat", "--bundle", str(tiny_bundle), "--decoder", "gguf:q8_0", "--no-verify",
                             "--max-new-tokens", "2"], capsys, monkeypatch, stdin)
    assert code == 0 and "internal error" not in err and "Traceback" not in err, (stdin, err)
