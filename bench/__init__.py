"""jacana.bench."""
