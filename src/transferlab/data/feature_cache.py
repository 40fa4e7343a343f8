"""Moved to transferlab.data.features; kept for the importers listed here until they import from there:
tests/test_performance.py (FeatureStore, fingerprint, weights_digest), scripts/sklearn_probe.py (compute_features)."""

from transferlab.data.features import FeatureStore, compute_features, fingerprint, weights_digest

__all__ = ["FeatureStore", "compute_features", "fingerprint", "weights_digest"]
