"""Fidelity against transformers: the fp32 reference, parity metrics, `validate`, the transformers bench worker."""
