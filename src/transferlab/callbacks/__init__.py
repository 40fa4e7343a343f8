"""Lightning callbacks that look inside the model while it trains: feature maps, ideal-class images, attacks."""

from transferlab.callbacks.adversarial import AdversarialEvaluation
from transferlab.callbacks.feature_maps import FeatureMaps
from transferlab.callbacks.ideal_class import IdealClassImages

__all__ = ["AdversarialEvaluation", "FeatureMaps", "IdealClassImages"]
