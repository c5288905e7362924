"""`medgemma-edge serve`: an OpenAI-compatible HTTP server and a browser page over the library.

    from medgemma_edge.serve import ServeConfig, serve
    serve(ServeConfig(port=8080), lambda: medgemma_edge.load("bundle", contexts=1))

Loopback by default, API keys beyond it, limits on every size, one audit line per request.
"""

from medgemma_edge.serve.limits import Limits
from medgemma_edge.serve.server import serve
from medgemma_edge.serve.state import ServeConfig

__all__ = ["Limits", "ServeConfig", "serve"]
