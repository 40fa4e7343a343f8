"""What every layer may use: errors, run context, redaction, hardware, guarded internals, small files, plots."""
