"""The commands (one module each) and what they share: the Hydra app, validation, one-line errors."""
