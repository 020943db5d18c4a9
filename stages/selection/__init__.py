"""jacana.stages.selection."""
