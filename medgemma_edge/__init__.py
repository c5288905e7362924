"""medgemma-edge: run MedGemma offline on hospital hardware, faithfully and measurably.

Research use only: not for clinical diagnosis (see the MedGemma model card's intended use).
"""

__version__ = "0.1.0"

from medgemma_edge.bundle import open_bundle  # noqa: E402
from medgemma_edge.errors import UserError  # noqa: E402
from medgemma_edge.loader import load, load_decoder_gguf  # noqa: E402
from medgemma_edge.pipeline import GenerationResult, Pipeline  # noqa: E402

__all__ = ["__version__", "load", "load_decoder_gguf", "open_bundle", "Pipeline", "GenerationResult", "UserError"]
