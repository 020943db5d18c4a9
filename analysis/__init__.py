"""jacana.analysis."""
