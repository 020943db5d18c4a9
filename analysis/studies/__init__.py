"""jacana.analysis.studies: is the optimum real? Hard scans, gradient-free baselines, multi-start."""
