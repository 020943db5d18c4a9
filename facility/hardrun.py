"""Running the conventional hard-mode analysis over a fileset, reading each chunk once.

:class:`ColumnStore` keeps the columns of every chunk in memory after the first read, so
repeated hard evaluations (a parameter scan, validation before and after an optimisation)
never re-read files.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from jacana.stages.analysis import hard_mode_histograms
from jacana.stages.columns import Columns, read_chunk
from jacana.stages.errors import ConfigError, FilesetError, InputFileError
from jacana.stages.fileset import Chunk, Fileset
from jacana.stages.reference import add_histograms, fill_histograms, to_arrays
from jacana.stages.spec import NOMINAL, AnalysisSpec

DEFAULT_CHUNK_SIZE = 100_000


def analysis_chunks(spec: AnalysisSpec, fileset: Fileset, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[Chunk]:
    """Every chunk the analysis needs, in a fixed order; a missing sample is an error naming it."""
    missing = [f"{s}/{v}" for s in spec.samples for v in spec.file_variations(s) if not fileset.has(s, v)]
    if missing:
        raise FilesetError(f"fileset {fileset.source} lacks what the analysis needs: {', '.join(missing)}")
    empty = [f"{s}/{v} ({', '.join(f.path for f in fileset.files(s, v))})" for s in spec.samples
             for v in spec.file_variations(s) if not any(f.nevts for f in fileset.files(s, v))]
    if empty:  # no chunk to read: say so now, not "no readable file left" after the others were read
        raise FilesetError(f"fileset {fileset.source}: every file of {'; '.join(empty)} is empty (nevts 0)")
    return [c for s in spec.samples for v in spec.file_variations(s) for c in fileset.chunks(s, v, chunk_size)]


def restricted_to(spec: AnalysisSpec, *filesets: Fileset) -> tuple[AnalysisSpec, list[str]]:
    """The analysis with only what every one of ``filesets`` has, and a line per thing left out (each
    once): see :func:`_restricted_to`."""
    left_out: list[str] = []
    for fileset in filesets:
        spec, dropped = _restricted_to(spec, fileset)
        left_out += dropped
    return spec, left_out


def _restricted_to(spec: AnalysisSpec, fileset: Fileset) -> tuple[AnalysisSpec, list[str]]:
    """The analysis with only what ``fileset`` has, and a line per thing left out: samples without
    nominal files (and their mentions in normalisation systematics and the pseudo-data), and
    alternative-sample systematics whose files are missing. The POI's sample must be there.

    For running on one's own files, which rarely hold every sample and variation of a config.
    """
    from jacana.stages.systematics import SYSTEMATICS

    raw, dropped = spec.to_dict(), []
    gone = [s for s in spec.samples if not fileset.has(s, NOMINAL)]
    poi_sample = spec.poi["sample"]
    if poi_sample in gone:
        raise FilesetError(f"fileset {fileset.source} has no nominal files of {poi_sample!r}, the sample of the"
                           f" parameter of interest ({spec.poi['name']}): nothing to measure")
    for s in gone:
        del raw["samples"][s]
        dropped.append(f"sample {s} (no nominal files)")
    for key, syst in list(raw["systematics"].items()):
        kind = SYSTEMATICS[syst["kind"]]
        if kind.category == "file":
            needed = [(s, v) for s in spec.samples for v in kind.file_variations(syst, s)]
            missing = [f"{s}/{v}" for s, v in needed if s not in gone and not fileset.has(s, v)]
            if missing or all(s in gone for s, _ in needed):
                del raw["systematics"][key]
                dropped.append(f"systematic {key} (no files of {', '.join(missing) or 'its sample'})")
        elif kind.category == "normalization" and syst["samples"] != "all":
            keep = [s for s in syst["samples"] if s not in gone]
            if not keep:
                del raw["systematics"][key]
                dropped.append(f"systematic {key} (its samples are left out)")
            else:
                syst["samples"] = keep
    for s, variations in list(raw.get("pseudo_data", {}).items()):
        if s in gone:
            del raw["pseudo_data"][s]
            continue
        present = [v for v in variations if fileset.has(s, v)]
        if present != list(variations):
            raw["pseudo_data"][s] = present or [NOMINAL]
            dropped.append(f"pseudo-data of {s}: {', '.join(v for v in variations if v not in present)} (no files)")
    if not dropped:
        return spec, []
    return AnalysisSpec(raw, source=f"{spec.source} + only what {fileset.source} has"), dropped


class ColumnStore:
    """Columns of each chunk, read on first use and kept in memory (branch names fixed by ``spec``)."""

    def __init__(self, spec: AnalysisSpec, reader: Callable[[Chunk, AnalysisSpec], Columns] = read_chunk):
        self.branches = spec.branches
        self._spec = spec
        self._reader = reader
        self._columns: dict[tuple, Columns] = {}
        self.reads = 0

    def get(self, chunk: Chunk) -> Columns:
        key = chunk.store_key
        if key not in self._columns:
            self._columns[key] = self._reader(chunk, self._spec)
            self.reads += 1
        return self._columns[key]

    def compatible(self, spec: AnalysisSpec) -> bool:
        return spec.branches == self.branches and spec.systematics == self._spec.systematics


BAD_FILE_POLICIES = ("fail", "skip")


class NonFiniteInputWarning(UserWarning):
    """An input branch held NaN/inf values, which were masked (named: file, branch, count)."""


class InputReport:
    """What went wrong with the inputs and was handled: skipped files, masked non-finite values.

    ``skip`` never corrects anything: a skipped file's events are simply missing from its
    sample (weights keep the fileset's ``nevts_total``), and the report says so.
    """

    def __init__(self, policy: str = "fail"):
        if policy not in BAD_FILE_POLICIES:
            raise ConfigError(f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {policy!r}")
        self.policy = policy
        self.skipped: dict[str, dict] = {}
        self.nonfinite: dict[str, int] = {}
        self.nonfinite_files: dict[str, dict[str, int]] = {}  # file -> branch -> values masked

    def should_skip(self, chunk: Chunk) -> bool:
        return chunk.path in self.skipped

    def file_failed(self, chunk: Chunk, error: InputFileError) -> None:
        if self.policy == "fail":
            raise error
        self.skipped[chunk.path] = {"path": chunk.path, "sample": chunk.sample, "variation": chunk.variation,
                                    "error": str(error)}

    def columns_read(self, columns: Columns) -> None:
        self.nonfinite_read(columns.chunk, columns.nonfinite)

    def nonfinite_read(self, chunk: Chunk, counts: dict[str, int]) -> None:
        """Count a chunk's masked NaN/inf values; the first of each file and branch is a warning on
        the console (a masked value changes the yields: an all-NaN genWeight zeroes a file)."""
        for branch, n in counts.items():
            self.nonfinite[branch] = self.nonfinite.get(branch, 0) + n
            per_file = self.nonfinite_files.setdefault(chunk.path, {})
            if branch not in per_file:
                warnings.warn(NonFiniteInputWarning(
                    f"{chunk.path}: branch {branch!r} has {n:,} non-finite (NaN/inf) values in entries"
                    f" {chunk.entry_start}-{chunk.entry_stop} ({chunk.n_events:,} events); masked (the object fails"
                    " every cut, a bad event weight becomes 0), so the yields change; totals per file in"
                    " result.json: inputs.nonfinite_values_by_file"), stacklevel=2)
            per_file[branch] = per_file.get(branch, 0) + n

    def to_dict(self) -> dict:
        return {"on_bad_file": self.policy, "skipped_files": list(self.skipped.values()),
                "nonfinite_values_masked": dict(self.nonfinite),
                "nonfinite_values_by_file": {f: dict(c) for f, c in self.nonfinite_files.items()}}


def hard_histograms(spec: AnalysisSpec, chunks: Iterable[Chunk], store: ColumnStore | None = None,
                    progress: bool = False, report: InputReport | None = None,
                    replicas: Callable[[Chunk], np.ndarray] | None = None) -> dict:
    """Hard-mode histograms ``{region: {sample: {variation: {"edges", "sumw", "sumw2"}}}}``.

    ``replicas``: a chunk's [R, events] weight multipliers (e.g. a bootstrap's); ``sumw`` and
    ``sumw2`` are then [R, bins], one row per replica (see :func:`~jacana.stages.reference.fill_histograms`).
    """
    if store is None or not store.compatible(spec):
        store = ColumnStore(spec)
    report = report or InputReport()
    chunks = list(chunks)
    per_sample: dict[str, dict] = {}
    for chunk in tqdm(chunks, desc="hard analysis", unit="chunk", disable=not progress):
        if report.should_skip(chunk):
            continue
        try:
            columns = store.get(chunk)
        except InputFileError as exc:
            report.file_failed(chunk, exc)
            continue
        report.columns_read(columns)
        fill = hard_mode_histograms if spec.is_general else fill_histograms
        add_histograms(per_sample.setdefault(chunk.sample, {}),
                       fill(columns, spec, None if replicas is None else replicas(chunk)))
    missing = [s for s in spec.samples if s not in per_sample]
    if missing:
        skipped = [v["error"] for v in report.skipped.values() if v["sample"] in missing]
        raise FilesetError(f"no readable file left for samples {missing}; "
                           + (f"skipped: {'; '.join(skipped)}" if skipped else "none of their chunks was given"))
    out: dict = {r: {} for r in spec.regions}
    for sample, by_region in per_sample.items():
        for region, by_var in by_region.items():
            out[region][sample] = {v: to_arrays(h) for v, h in by_var.items()}
    for region in out:  # a variation whose every file was skipped is an error, not a zero
        for sample in spec.samples:
            absent = [v for v in spec.histogram_variations(sample) if v not in out[region][sample]]
            if absent:
                raise FilesetError(f"no readable file left for {sample} variations {absent}")
    return out
