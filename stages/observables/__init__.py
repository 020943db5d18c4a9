"""jacana.stages.observables: per-event observables with exact hard limits (HT, m_bjj, the NN)."""
