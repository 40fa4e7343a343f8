"""Moved to transferlab.data.features; kept for the importers listed in data/feature_cache.py while the work that
moved it lands (no module of this repository imports this path any more)."""

from transferlab.data.features import FeatureStore, file_sha256, finite_rows

__all__ = ["FeatureStore", "file_sha256", "finite_rows"]
