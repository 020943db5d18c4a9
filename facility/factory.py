"""The executor the options ask for: in-process, dask (local cluster, scheduler, client, profile), or
coffea's Runner (its iterative, futures or dask executor)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from jacana.facility.executor import Executor, InProcessExecutor
from jacana.facility.hardrun import InputReport
from jacana.stages.fileset import Chunk
from jacana.stages.spec import AnalysisSpec


def make_executor(spec: AnalysisSpec, chunks: Iterable[Chunk], workers: int | None = None, scheduler: str | None = None,
                  client=None, profile: str | Mapping | None = None, progress: bool = False,
                  report: InputReport | None = None, stage_factory=None, coffea: str | None = None,
                  fileset=None, chunk_size: int = 100_000, dtype: str = "float64", **kwargs: Any) -> Executor:
    """In-process when none of ``workers``, ``scheduler``, ``client``, ``profile`` is given (or
    ``workers=0``), else a :class:`~jacana.facility.dask_executor.DaskExecutor` (imported only then).
    ``coffea`` (``"iterative"``, ``"futures"``, ``"dask"``): through coffea's Runner instead
    (:class:`~jacana.facility.coffea_adapter.CoffeaExecutor` on ``fileset``: every step is a Runner
    pass over the files, ``workers`` processes for futures, ``client`` for dask).
    ``stage_factory``: what runs on the data (default: the soft analysis; see
    :data:`jacana.stages.soft_stage.ChunkStageFactory`); ``dtype``: the event batches' precision
    ("float32": mixed precision; the in-process and dask executors)."""
    if coffea is not None:
        if np.dtype(dtype) != np.float64:  # refused before coffea is imported
            raise ValueError(f"coffea's Runner builds float64 batches; dtype {dtype!r} needs the in-process or dask"
                             " executor")
        from jacana.facility.coffea_adapter import COFFEA_EXECUTORS, CoffeaExecutor

        if coffea not in COFFEA_EXECUTORS:
            raise ValueError(f"coffea must be one of {COFFEA_EXECUTORS}, got {coffea!r}")
        if fileset is None:
            raise ValueError("coffea's Runner needs the fileset (fileset=...)")
        return CoffeaExecutor(spec, fileset, coffea, workers=workers or 2, client=client, chunksize=chunk_size,
                              report=report, stage_factory=stage_factory, progress=progress)
    if client is None and scheduler is None and profile is None and not workers:
        return InProcessExecutor(spec, chunks, progress=progress, report=report, dtype=np.dtype(dtype),
                                 **({"stage_factory": stage_factory} if stage_factory else {}))
    from jacana.facility.dask_executor import DaskExecutor

    return DaskExecutor(spec, chunks, client=client, scheduler=scheduler, workers=workers, profile=profile,
                        progress=progress, report=report, stage_factory=stage_factory, dtype=np.dtype(dtype), **kwargs)
