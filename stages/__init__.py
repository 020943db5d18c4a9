"""jacana.stages: what is computed, from columns to the objective.

The analysis config (:mod:`.spec`), fileset and column reading, dense batches, the conventional
hard analysis (:mod:`.reference`), the soft analysis (:mod:`.analysis`, as the protocol stage
:mod:`.soft_stage`) and the statistics (:mod:`.stats`). Knows nothing of where it runs.
"""
