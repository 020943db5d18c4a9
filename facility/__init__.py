"""jacana.facility."""
