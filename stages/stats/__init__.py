"""jacana.stages.stats."""
