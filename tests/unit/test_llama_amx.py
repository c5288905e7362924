"""llama.cpp's AMX kernels segfault on the first decode on AMX Xeons: the runtime turns them off when a build has
them, and the Makefile's build leaves them out (backends/llama_cpp/lib.py)."""

from __future__ import annotations

import pytest

from medgemma_edge.backends.llama_cpp.lib import has_amx_kernels, quiet_llama, use_extra_buffers

pytestmark = pytest.mark.unit

AMX_BUILD = ("CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | "
             "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |")


def test_an_amx_build_is_recognised_from_its_system_info() -> None:
    assert has_amx_kernels(AMX_BUILD)
    assert not has_amx_kernels(AMX_BUILD.replace("AMX_INT8 = 1 | ", ""))
    assert not has_amx_kernels(AMX_BUILD.replace("AMX_INT8 = 1", "AMX_INT8 = 0"))


def test_the_installed_build_keeps_its_repacked_kernels() -> None:
    """The venv's llama.cpp, built by `make venv` (-mno-amx-int8 on x86), has no AMX kernels, so the
    runtime keeps llama.cpp's extra (repacked) weight buffers on every CPU."""
    import llama_cpp

    quiet_llama()
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    assert not has_amx_kernels(info), f"this llama.cpp has AMX kernels ({info}); rebuild it as the Makefile does"
    assert use_extra_buffers()
