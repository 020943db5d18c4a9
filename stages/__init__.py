"""jacana.stages."""
