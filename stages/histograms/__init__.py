"""jacana.stages.histograms."""
