"""`convert --onnx-attention portable` and `run --providers openvino,cpu` as a user runs them: the tiny checkpoint
through the CLI, the recipe in the manifest, and the same greedy answer from OpenVINO's provider (its plugin,
fp32) as from ONNX Runtime's CPU provider, or, where the plugin lists no device (an AMD CPU), a one-line error
saying so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import assert_one_line_error, openvino_plugin_kinds, run_cli


@pytest.fixture(scope="module")
def portable_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("portable") / "bundle"
    res = run_cli("convert", tiny_ckpt, "-o", out, "--gguf", "f32", "--onnx-decoder", "fp32",
                  "--onnx-attention", "portable")
    assert res.returncode == 0, res.stderr
    return out


def _answer(bundle: Path, *providers: str) -> dict:
    res = run_cli("run", "--bundle", bundle, "--decoder", "onnx:fp32", "--json", "--max-new-tokens", "8",
                  "--threads", "2", *providers, "Describe a normal chest X-ray")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_the_recipe_says_portable(portable_bundle: Path) -> None:
    manifest = json.loads((portable_bundle / "manifest.json").read_text())
    recipe = next(a["recipe"] for a in manifest["artifacts"] if a["format"] == "onnx" and a["kind"] == "decoder")
    assert recipe["attention_ops"] == "portable" and recipe["opset"] == 17 and "ScatterElements" in recipe["kv_cache"]


def test_openvino_answers_as_the_cpu_does_or_says_it_cannot(portable_bundle: Path) -> None:
    if not openvino_plugin_kinds():
        assert_one_line_error(run_cli("run", "--bundle", portable_bundle, "--decoder", "onnx:fp32", "--providers",
                                      "openvino,cpu", "hello"), "lists no device", "--providers cpu")
        return
    cpu = _answer(portable_bundle)
    ov = _answer(portable_bundle, "--providers", "openvino,cpu")
    assert ov["providers"]["decoder"][0] == "OpenVINOExecutionProvider", ov["providers"]
    assert cpu["providers"]["decoder"] == ["CPUExecutionProvider"], cpu["providers"]
    assert ov["text"] == cpu["text"] and ov["tokens"]["generated"] == cpu["tokens"]["generated"] == 8


def test_bad_attention_and_device_are_one_line(tiny_ckpt: Path, portable_bundle: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("convert", tiny_ckpt, "-o", tmp_path / "b", "--gguf", "f32", "--onnx-decoder",
                                  "fp32", "--onnx-attention", "flash"), "--onnx-attention")
    assert not (tmp_path / "b").exists()
    assert_one_line_error(run_cli("run", "--bundle", portable_bundle, "--decoder", "onnx:fp32", "--providers",
                                  "openvino:tpu,cpu", "hello"), "TPU", "--providers")


def test_openvino_conversion_still_works_after_the_plugin_loads(portable_bundle: Path) -> None:
    """The plugin ships its own libopenvino (same soname, no PyTorch front end); whichever loads first serves
    both, so the runtime loads the `openvino` package's first. In a fresh process, so the order is the test's."""
    import subprocess
    import sys

    script = (
        "import json, sys, torch\n"
        "from medgemma_edge import UserError\n"
        "from medgemma_edge.bundle import open_bundle\n"
        "from medgemma_edge.backends.onnx.decoder import OnnxDecoderModel\n"
        "from medgemma_edge.backends.onnx.session import provider_names\n"
        "b = open_bundle(sys.argv[1])\n"
        "a = next(a for a in b.artifacts if a.format == 'onnx')\n"
        "try:\n"  # the plugin is registered before a device is chosen, so the order is tested on any CPU
        "    providers = OnnxDecoderModel(b.path(a), b.config,\n"
        "                                 providers=provider_names(['openvino', 'cpu'])).providers\n"
        "except UserError:\n"
        "    providers = []\n"
        "import openvino as ov\n"  # after the plugin: the order that failed
        "ov.convert_model(torch.nn.Linear(4, 4), example_input=torch.zeros(1, 4))\n"
        "print(json.dumps(providers))\n"
    )
    res = subprocess.run([sys.executable, "-c", script, str(portable_bundle)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    providers = json.loads(res.stdout.strip().splitlines()[-1])
    assert providers[:1] == (["OpenVINOExecutionProvider"] if openvino_plugin_kinds() else []), providers


def test_the_memory_check_counts_a_second_cache_buffer_off_the_cpu_provider(portable_bundle: Path) -> None:
    """Off the CPU provider each cache gets a second buffer (the calls alternate), so the preflight counts the KV
    cache twice. It refuses before any session is made, so this needs no OpenVINO device."""
    import re

    from medgemma_edge import UserError, load

    kv = []
    for providers in (["CPUExecutionProvider"], ["OpenVINOExecutionProvider:CPU", "CPUExecutionProvider"]):
        with pytest.raises(UserError, match="needs about") as refused:
            load(portable_bundle, decoder="onnx:fp32", text_only=True, providers=providers, memory_limit=1,
                 n_ctx=131072)
        kv.append(float(re.search(r"kv_cache ([0-9.]+)", str(refused.value)).group(1)))
    assert kv[0] > 0.05 and kv[1] == pytest.approx(2 * kv[0], rel=0.1), kv
