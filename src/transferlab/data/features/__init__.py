"""Pooled backbone features of images, computed once and reused by every frozen-backbone run and audit that can.

- keys.py: the store's fingerprint (backbone, weights, transform, precision, library versions) and image keys;
- store.py: the store on disk or in memory (self-checking shards, the fill lock);
- fill.py: the one fill loop (loader over the missing images -> backbone -> shards), used by the training
  callback (callbacks.feature_cache), the audit and the embedding map (insight.embeddings);
- datasets.py: augmented views going in, (features, label) pairs coming out (+ the teacher's logits: finetune=distill).
"""

from transferlab.data.features.datasets import DistillDataset, FeatureDataset, ViewsDataset
from transferlab.data.features.fill import Extractor, Fill, FillSettings, compute_features, feature_batches, fill_features
from transferlab.data.features.keys import LIBRARIES, Inputs, describe, fingerprint, image_key, library_versions, weights_digest
from transferlab.data.features.store import FeatureStore, file_sha256, finite_rows

__all__ = [
    "LIBRARIES",
    "DistillDataset",
    "Extractor",
    "FeatureDataset",
    "FeatureStore",
    "Fill",
    "FillSettings",
    "Inputs",
    "ViewsDataset",
    "compute_features",
    "describe",
    "feature_batches",
    "file_sha256",
    "fill_features",
    "fingerprint",
    "finite_rows",
    "image_key",
    "library_versions",
    "weights_digest",
]
