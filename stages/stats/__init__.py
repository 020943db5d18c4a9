"""jacana.stages.stats: histograms -> pyhf workspace -> traced likelihood -> objective (and pyhf's own inference)."""
