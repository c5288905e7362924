"""Model families, one module each; importing this package registers them all (convert/registry.py)."""

from convert.models import gemma3, gemma3_text  # noqa: F401
