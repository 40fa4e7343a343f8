"""Lightning callbacks: looking inside the model (feature maps, ideal-class images, attacks) and the frozen-feature cache."""

from transferlab.callbacks.adversarial import AdversarialEvaluation
from transferlab.callbacks.feature_cache import FeatureCache
from transferlab.callbacks.feature_maps import FeatureMaps
from transferlab.callbacks.ideal_class import IdealClassImages

__all__ = ["AdversarialEvaluation", "FeatureCache", "FeatureMaps", "IdealClassImages"]
