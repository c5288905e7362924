"""Synthetic checkpoints in MedGemma's published layout, with the real Gemma 3 tokenizer files."""
