"""jacana.facility: where the per-chunk stage runs (in-process, dask, coffea) and how a cluster is set up."""
