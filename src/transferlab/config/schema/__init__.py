"""The shape of every command's config: which keys exist, what type each holds and the range it must lie in.
Never a default value.

Default values live in one place, the YAML under conf/ (each file documents its keys); these schemas only say
what a key may hold, and `config.validation` checks a composed config against them before a command does any
work. A range is declared on the field itself (`Annotated[int, Bounds(ge=1)]`, core.bounds), so the checker and
the configuration reference read type and range from one declaration. A field may be left out of the YAML only
when its type admits None. Nodes that Hydra instantiates (datamodule, optimizer, scheduler, Trainer, loggers,
callbacks) are `Target`s: they are checked against the signature of the class they name (upgrading Lightning or
torch never needs an edit here), with the ranges of our keys declared as `Params`.
tests/test_config_schema.py composes every command and every option and fails when YAML and schema disagree.
"""

from transferlab.config.schema.commands import (
    COMMANDS,
    OPEN_NODES,
    OUR_VALUES,
    Attack,
    Audit,
    Eval,
    Explain,
    Export,
    Predict,
    Rank,
    Report,
    Serve,
    Train,
    Visualize,
)
from transferlab.config.schema.nodes import (
    AuditDuplicates,
    Backbone,
    CrossValidation,
    EvalData,
    FeatureCache,
    Finetune,
    Interpret,
    Paths,
    Performance,
    Target,
    Targets,
    Tune,
)

__all__ = [
    "COMMANDS",
    "OPEN_NODES",
    "OUR_VALUES",
    "Attack",
    "Audit",
    "AuditDuplicates",
    "Backbone",
    "CrossValidation",
    "Eval",
    "EvalData",
    "Explain",
    "Export",
    "FeatureCache",
    "Finetune",
    "Interpret",
    "Paths",
    "Performance",
    "Predict",
    "Rank",
    "Report",
    "Serve",
    "Target",
    "Targets",
    "Train",
    "Tune",
    "Visualize",
]
