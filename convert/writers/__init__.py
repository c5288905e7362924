"""Artifact writers: GGUF decoder and mmproj, ONNX vision encoder and decoder."""
