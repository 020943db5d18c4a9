"""jacana.protocol."""
