"""medgemma-edge: run MedGemma offline on hospital hardware, faithfully and measurably.

Research use only: not for clinical diagnosis (see the MedGemma model card's intended use).

    pipe = medgemma_edge.load("bundle", encoder="onnx:int8", decoder="gguf:q4_k_m")
    result = medgemma_edge.generate(pipe, "Describe this X-ray", images=["cxr.png"])
    for chunk in medgemma_edge.stream_generate(pipe, "Any effusion?", images=["cxr.png"]):
        print(chunk.text, end="")
"""

__version__ = "0.1.0"

from medgemma_edge.bundle import open_bundle  # noqa: E402
from medgemma_edge.errors import UserError  # noqa: E402
from medgemma_edge.runtime.caches import ImageCache, PromptCache  # noqa: E402
from medgemma_edge.runtime.chat import ChatSession  # noqa: E402
from medgemma_edge.runtime.generate import GenerationChunk, GenerationResult, generate, stream_generate  # noqa: E402
from medgemma_edge.runtime.loader import load, load_decoder_gguf  # noqa: E402
from medgemma_edge.runtime.pipeline import Pipeline  # noqa: E402
from medgemma_edge.runtime.sampling import SamplingParams  # noqa: E402

__all__ = ["__version__", "load", "load_decoder_gguf", "generate", "stream_generate", "ChatSession", "SamplingParams",
           "GenerationChunk", "GenerationResult", "Pipeline", "PromptCache", "ImageCache", "open_bundle", "UserError"]
