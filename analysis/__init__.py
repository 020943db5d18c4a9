"""jacana.analysis: what to compute: the optimised chain, ``evaluate``, ``optimize`` and their plots."""
