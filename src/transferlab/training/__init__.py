"""Building a run from its config and what it leaves behind: builders, performance, checkpoints, loggers, artefacts."""
