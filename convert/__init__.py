"""Conversion: a Hugging Face checkpoint to a bundle (needs the `convert` extra: torch, transformers, gguf, onnx).

Importing the package registers every model family (convert/models/) with convert/registry.py.
"""

import convert.models  # noqa: F401
