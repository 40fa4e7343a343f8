"""Multiruns: job records, the Optuna study, DDP inside sweep jobs, the sweep summary and report."""
