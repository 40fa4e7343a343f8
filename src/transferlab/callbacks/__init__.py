"""Every Lightning callback transferlab adds to a run, one module each.

Pictures and probes of the model (feature_maps, cam, ideal_class, adversarial), the frozen-feature cache, the
checkpoint written every epoch (checkpoints), gradual unfreezing (unfreeze) and Optuna pruning. The ones a
config names by `_target_` are exported here; a new callback is a module here and a YAML file in conf/callbacks/.
"""

from transferlab.callbacks.adversarial import AdversarialEvaluation
from transferlab.callbacks.cam import ClassActivationMaps
from transferlab.callbacks.checkpoints import LastCheckpoint
from transferlab.callbacks.feature_cache import FeatureCache
from transferlab.callbacks.feature_maps import FeatureMaps
from transferlab.callbacks.ideal_class import IdealClassImages
from transferlab.callbacks.optuna_pruning import OptunaPruning
from transferlab.callbacks.unfreeze import GradualUnfreeze

__all__ = [
    "AdversarialEvaluation",
    "ClassActivationMaps",
    "FeatureCache",
    "FeatureMaps",
    "GradualUnfreeze",
    "IdealClassImages",
    "LastCheckpoint",
    "OptunaPruning",
]
