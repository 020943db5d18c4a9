"""The executor the options ask for: in-process, or dask (local cluster, scheduler, client, profile)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from jacana.facility.executor import Executor, InProcessExecutor
from jacana.facility.hardrun import InputReport
from jacana.stages.fileset import Chunk
from jacana.stages.spec import AnalysisSpec


def make_executor(spec: AnalysisSpec, chunks: Iterable[Chunk], workers: int | None = None, scheduler: str | None = None,
                  client=None, profile: str | Mapping | None = None, progress: bool = False,
                  report: InputReport | None = None, stage_factory=None, **kwargs: Any) -> Executor:
    """In-process when none of ``workers``, ``scheduler``, ``client``, ``profile`` is given (or
    ``workers=0``), else a :class:`~jacana.facility.dask_executor.DaskExecutor` (imported only then).
    ``stage_factory``: what runs on the data (default: the soft analysis; see
    :data:`jacana.stages.soft_stage.ChunkStageFactory`)."""
    if client is None and scheduler is None and profile is None and not workers:
        return InProcessExecutor(spec, chunks, progress=progress, report=report,
                                 **({"stage_factory": stage_factory} if stage_factory else {}))
    from jacana.facility.dask_executor import DaskExecutor

    return DaskExecutor(spec, chunks, client=client, scheduler=scheduler, workers=workers, profile=profile,
                        progress=progress, report=report, stage_factory=stage_factory, **kwargs)
