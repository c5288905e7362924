"""Measurement: benchmarks, the llama.cpp baseline, hardware fingerprint and advice, validation reports."""
