"""jacana.stages.selection: soft cuts and soft multiplicity requirements with exact hard limits."""
