"""The bundle: the contract between conversion and runtime (manifest, artifacts, precisions, GGUF headers)."""

from medgemma_edge.bundle.artifacts import Artifact
from medgemma_edge.bundle.manifest import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, open_bundle, write_manifest

__all__ = ["Artifact", "Bundle", "FORMAT", "FORMAT_VERSION", "MANIFEST", "open_bundle", "write_manifest"]
