"""One-time setup of the native llama.cpp / mtmd libraries: backend init and log routing.

llama.cpp prints hundreds of lines to stderr on every load; they go to the `medgemma_edge.native`
logger instead (visible with `--verbose`), so streamed answers stay clean.
"""

from __future__ import annotations

import ctypes
import logging

from medgemma_edge.errors import UserError

log = logging.getLogger("medgemma_edge.native")  # the name --verbose users know
own_log = logging.getLogger(__name__)  # our own warnings about the library, shown without --verbose
# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error (5 continues the previous message). Every failure
# also surfaces as our own UserError, so llama.cpp's lines are details for --verbose only.
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.INFO}
_state: dict[str, object] = {}


def _make_callback(llama_cpp: object) -> object:
    buf: list[str] = []
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback  # type: ignore[attr-defined, misc]
    def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        # level 5 continues the previous message
        last[0] = last[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
        buf.append(text.decode("utf-8", errors="replace"))
        if buf[-1].endswith("\n"):
            line = "".join(buf).rstrip()
            buf.clear()
            log.log(last[0], "%s", line)

    return callback


def quiet_llama() -> None:
    """Initialise the llama.cpp backend once and route its logs (llama and mtmd) to logging."""
    if "callback" in _state:
        return
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except (OSError, RuntimeError) as exc:  # llama-cpp-python loads its libraries at import
        raise UserError(f"llama.cpp's shared libraries failed to load ({exc}); check LLAMA_CPP_LIB_PATH and "
                        f"MTMD_CPP_LIB (each a folder holding libllama / libmtmd) or unset them; "
                        f"`medgemma-edge doctor` shows what is loaded") from exc

    callback = _make_callback(llama_cpp)
    _state["callback"] = callback  # keep the ctypes callback alive for the process lifetime
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


# llama.cpp's AMX kernels (ggml_backend_amx_mul_mat) segfaulted on the first decode of every quantized GGUF on a
# 2-vCPU AMX Xeon (2026-12-04; llama.cpp issue 20824, closed unfixed). They live in an "extra" weight buffer
# beside the repacked AVX kernels, and llama.cpp can only switch the extras off together.
AMX_FREE_BUILD = ('CMAKE_ARGS="-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8" '
                  "pip install --force-reinstall --no-deps --no-cache-dir 'llama-cpp-python==0.3.36'")


def has_amx_kernels(system_info: str) -> bool:
    """Whether a llama.cpp build (its `llama_print_system_info()` line) was compiled with AMX kernels."""
    return "AMX_INT8 = 1" in system_info


def use_extra_buffers() -> bool:
    """llama_model_params.use_extra_bufts for this library: off when it has AMX kernels, so that no native
    crash can happen; llama.cpp then runs without repacked weights (decode ~0.8x on a 2-core AMX Xeon).
    Warned once, with the rebuild."""
    import llama_cpp

    if "amx" not in _state:
        _state["amx"] = has_amx_kernels(llama_cpp.llama_print_system_info().decode(errors="replace"))
        if _state["amx"]:
            own_log.warning(
                "this llama.cpp build has AMX kernels, which crash on AMX CPUs (llama.cpp issue 20824): running "
                "without its repacked weights (slower decoding); rebuild it without them: %s", AMX_FREE_BUILD)
    return not _state["amx"]
