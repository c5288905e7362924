"""`medgemma-edge doctor` and the hardware fingerprint, against the real llama.cpp and ONNX Runtime.

The library-override variables are only read when llama_cpp is first imported, so every case that
sets them runs the console script in its own process, exactly as a user's shell would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from medgemma_edge.measure.doctor import advice
from medgemma_edge.measure.hardware import fingerprint, slug

CLI = Path(sys.executable).with_name("medgemma-edge")
TIMEOUT_S = 60


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if not CLI.is_file():
        pytest.fail(f"console script {CLI} is missing: install the package (pip install -e .) into this venv")
    clean = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    return subprocess.run([str(CLI), "doctor", *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**clean, **(env or {})})


@pytest.fixture(scope="module")
def fp() -> dict[str, Any]:
    return fingerprint()


def test_fingerprint_reports_the_loaded_runtimes(fp: dict[str, Any]) -> None:
    llama = fp["llama_cpp"]
    assert llama["error"] is None
    assert Path(llama["library"]).is_file() and Path(llama["library"]).name.startswith("libllama")
    assert Path(llama["mtmd_library"]).is_file()
    assert "CPU" in llama["system_info"]
    assert any(dev["name"] == "CPU" for dev in llama["backends"])
    assert isinstance(llama["gpu_offload"], bool)
    assert "CPUExecutionProvider" in fp["onnxruntime"]["providers"]
    assert fp["cpu"]["logical_cores"] >= 1 and fp["cpu"]["usable_cores"] >= 1
    assert fp["ram_gb"] > 0
    assert isinstance(fp["gpus"], list)
    assert fp["versions"]["llama_cpp_python"] and fp["versions"]["onnxruntime"]
    json.dumps(fp)  # result files store it as is


def test_slug_is_filesystem_safe(fp: dict[str, Any]) -> None:
    name = slug(fp)
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) and len(name) <= 64
    assert name.endswith(f"-{fp['cpu']['logical_cores']}c")


@pytest.mark.parametrize(("cpu", "cores", "gpu", "expected"), [
    ("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", 16, "NVIDIA H100 80GB HBM3", "intel-xeon-gold-6338-16c-h100"),
    ("AMD EPYC 7763 64-Core Processor", 2, None, "amd-epyc-7763-2c"),
    ("AMD Ryzen 9 7950X 16-Core Processor", 32, "NVIDIA GeForce RTX 4090", "amd-ryzen-9-7950x-32c-rtx-4090"),
    ("Apple M2 Pro", 12, "Apple silicon GPU (Metal)", "m2-pro-12c"),
    (None, None, None, "cpu"),
])
def test_slug_names(cpu: str | None, cores: int | None, gpu: str | None, expected: str) -> None:
    fake = {"cpu": {"model": cpu, "arch": None, "logical_cores": cores}, "gpus": [{"name": gpu}] if gpu else []}
    assert slug(fake) == expected


def test_doctor_prints_library_and_providers(fp: dict[str, Any]) -> None:
    res = doctor()
    assert res.returncode == 0, res.stderr
    assert fp["llama_cpp"]["library"] in res.stdout
    assert "CPUExecutionProvider" in res.stdout and "LLAMA_CPP_LIB_PATH=(unset)" in res.stdout


def test_doctor_json(fp: dict[str, Any]) -> None:
    res = doctor("--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["fingerprint"]["llama_cpp"]["library"] == fp["llama_cpp"]["library"]
    assert "CPUExecutionProvider" in out["fingerprint"]["onnxruntime"]["providers"]
    assert out["slug"] == slug(fp) and isinstance(out["advice"], list)


def test_lib_path_env_loads_the_named_folder(fp: dict[str, Any], tmp_path: Path) -> None:
    # A copy of the bundled libraries stands in for a cmake build: both variables name the folder.
    libs = tmp_path / "lib"
    shutil.copytree(Path(fp["llama_cpp"]["library"]).parent, libs, symlinks=True)
    res = doctor("--json", env={"LLAMA_CPP_LIB_PATH": str(libs), "MTMD_CPP_LIB": str(libs)})
    assert res.returncode == 0, res.stderr
    llama = json.loads(res.stdout)["fingerprint"]["llama_cpp"]
    assert Path(llama["library"]).parent == libs.resolve()
    assert Path(llama["mtmd_library"]).parent == libs.resolve()
    assert llama["lib_path_env"] == {"LLAMA_CPP_LIB_PATH": str(libs), "MTMD_CPP_LIB": str(libs)}
    assert llama["ggml_libraries"] and all(Path(p).parent == libs.resolve() for p in llama["ggml_libraries"])


def test_lib_path_env_without_libllama_is_reported(tmp_path: Path) -> None:
    res = doctor(env={"LLAMA_CPP_LIB_PATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert f"LLAMA_CPP_LIB_PATH={tmp_path} has no libllama" in res.stdout
    assert "cannot load" in res.stdout


def test_run_with_a_wrong_lib_path_is_one_line(tmp_path: Path) -> None:
    """`run` imports llama.cpp at load time: a wrong folder must be a clear error, not a traceback."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the libraries fail first
    clean = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    res = subprocess.run([str(CLI), "run", "--decoder-gguf", str(gguf), "--raw", "hi"], capture_output=True,
                         text=True, timeout=TIMEOUT_S, env={**clean, "LLAMA_CPP_LIB_PATH": str(tmp_path)})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "LLAMA_CPP_LIB_PATH" in res.stderr and "doctor" in res.stderr


def test_mtmd_lib_given_a_file_is_reported(fp: dict[str, Any]) -> None:
    mtmd = fp["llama_cpp"]["mtmd_library"]
    res = doctor(env={"MTMD_CPP_LIB": mtmd})
    assert res.returncode == 0, res.stderr
    assert f"MTMD_CPP_LIB={mtmd} is a file" in res.stdout
    assert f"export MTMD_CPP_LIB={Path(mtmd).parent}" in res.stdout


def _fake(vendor: str | None, offload: bool, providers: list[str]) -> dict[str, Any]:
    return {"cpu": {"flags": ["avx2"]}, "gpus": [{"name": f"{vendor} GPU", "vendor": vendor}] if vendor else [],
            "llama_cpp": {"error": None, "gpu_offload": offload, "system_info": "CPU : AVX2 = 1 |", "lib_path_env": {}},
            "onnxruntime": {"providers": providers}}


@pytest.mark.parametrize(("vendor", "offload", "providers", "expect", "absent"), [
    ("NVIDIA", False, ["CPUExecutionProvider"], ["-DMEDGEMMA_BACKEND=cuda", "medgemma-edge[gpu]"], []),
    ("NVIDIA", True, ["CUDAExecutionProvider", "CPUExecutionProvider"], [], ["cmake", "[gpu]"]),
    ("Apple", False, ["CoreMLExecutionProvider", "CPUExecutionProvider"], ["-DMEDGEMMA_BACKEND=metal"], ["[gpu]"]),
    ("AMD", False, ["CPUExecutionProvider"], ["-DMEDGEMMA_BACKEND=vulkan"], ["[gpu]"]),
    ("Intel", False, ["CPUExecutionProvider"], ["-DMEDGEMMA_BACKEND=vulkan"], []),
    (None, False, ["CPUExecutionProvider"], [], ["cmake"]),
])
def test_gpu_advice(vendor: str | None, offload: bool, providers: list[str], expect: list[str],
                    absent: list[str]) -> None:
    text = "\n".join(advice(_fake(vendor, offload, providers)))
    for needle in expect:
        assert needle in text
    for needle in absent:
        assert needle not in text
    if "MEDGEMMA_BACKEND" in text:
        assert "export LLAMA_CPP_LIB_PATH=" in text and "MTMD_CPP_LIB=" in text


def test_cpu_build_advised_when_library_lacks_cpu_features() -> None:
    fake = _fake(None, False, ["CPUExecutionProvider"])
    fake["cpu"]["flags"] = ["avx2", "avx512f"]
    text = "\n".join(advice(fake))
    assert "AVX512" in text and "-DMEDGEMMA_BACKEND=cpu" in text


def test_amx_kernels_are_advised_away_and_never_asked_for() -> None:
    """An AMX CPU with our AMX-free build gets no rebuild tip; a build with AMX kernels gets the AMX-free one."""
    fake = _fake(None, False, ["CPUExecutionProvider"])
    fake["cpu"]["flags"] = ["avx2", "amx_int8"]
    assert not any("AMX" in tip or "cmake" in tip for tip in advice(fake))
    fake["llama_cpp"]["system_info"] = "CPU : AVX2 = 1 | AMX_INT8 = 1 |"
    text = "\n".join(advice(fake))
    assert "AMX kernels" in text and "-mno-amx-int8" in text
