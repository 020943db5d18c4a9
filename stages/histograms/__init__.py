"""jacana.stages.histograms: relaxed weighted histograms whose hard limit is hist's."""
