"""Run the server: check the settings, bind, announce the address, load the model in the background
(/health answers 503 meanwhile), serve until SIGINT/SIGTERM, then stop every generation and free the model."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator

import uvicorn

from medgemma_edge.runtime.audit import AuditLog
from medgemma_edge.runtime.pipeline import Pipeline
from medgemma_edge.serve.app import create_app
from medgemma_edge.serve.auth import check_bind
from medgemma_edge.serve.records import AuditTrail
from medgemma_edge.serve.state import ServeConfig, ServerState

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, except that SIGINT/SIGTERM end `run()` normally instead of re-raising the signal after
    shutdown, so the caller still stops its generations and frees the model, and the exit status is 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(config: ServeConfig, load: Callable[[], Pipeline], announce: Callable[[str], None] = log.warning,
          verbose: bool = False) -> None:
    """Serve until interrupted. `load` builds the pipeline (e.g. `lambda: medgemma_edge.load(bundle, contexts=N)`);
    its UserError (a bundle that does not load) stops the server and is raised here."""
    check_bind(config.host, list(config.api_keys))  # before binding anything
    audit = AuditTrail(AuditLog(config.audit_log, config.audit_include_text) if config.audit_log else None)
    state = ServerState(config, load, audit)
    server = _Server(uvicorn.Config(
        create_app(state), host=config.host, port=config.port, log_config=None, access_log=False,
        log_level="info" if verbose else "warning", lifespan="off", server_header=False,
        timeout_keep_alive=5, timeout_graceful_shutdown=5))

    def start() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.should_exit:
            return
        sock = server.servers[0].sockets[0].getsockname()
        host = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
        announce(f"listening on http://{host}:{sock[1]} (loading the model; /health answers 503 until ready)")
        state.load()
        if state.load_error is not None:
            server.should_exit = True
            return
        announce(f"ready: {config.limits.parallel} slot(s); research use only")

    loader = threading.Thread(target=start, name="loader", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        server.should_exit = True
        loader.join(timeout=1.0)
        state.close()
    if state.load_error is not None:
        raise state.load_error
    if not server.started:
        from medgemma_edge.errors import UserError

        raise UserError(f"could not listen on {config.host}:{config.port} (in use, or not an address of this "
                        f"machine); choose another --port or --host")
