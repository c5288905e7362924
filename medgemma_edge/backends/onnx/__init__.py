"""ONNX Runtime: sessions and providers, the decoder graph, the vision encoder graph."""
