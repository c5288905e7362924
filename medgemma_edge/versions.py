"""Versions of the packages medgemma-edge runs on, for manifests and hardware fingerprints."""

from __future__ import annotations

from importlib import metadata


def package_version(*dists: str) -> str | None:
    """The first installed distribution's version (e.g. onnxruntime, else onnxruntime-gpu), or None."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
