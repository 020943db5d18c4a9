"""jacana.analysis.studies."""
