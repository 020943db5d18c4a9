"""jacana.samples: the synthetic AGC-like event generator and the embedded default dataset."""
