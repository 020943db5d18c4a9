"""jacana.stages.observables.kinematics."""
