"""One-time setup of the native llama.cpp / mtmd libraries: backend init and log routing.

llama.cpp prints hundreds of lines to stderr on every load; they go to the `medgemma_edge.native`
logger instead (visible with `--verbose`), so streamed answers stay clean.
"""

from __future__ import annotations

import ctypes
import logging

from medgemma_edge.errors import UserError

log = logging.getLogger("medgemma_edge.native")  # the name --verbose users know
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
    if _state:
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
