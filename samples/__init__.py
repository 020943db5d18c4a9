"""jacana.samples."""
