"""Filesets in the shape of the AGC's ``nanoaod_inputs.json`` (or coffea's) and their split into chunks.

A fileset maps process -> variation -> ``{"files": [{"path", "nevts"}], "nevts_total"}``;
coffea's ``{dataset: {"files": {path: tree}, "metadata": {"sample", "variation", "nevts"}}}``
and its preprocessed form (``files: {path: {"object_path", "steps", "num_entries"}}``) are read
too. Relative paths are resolved against the fileset file's folder. Every value is checked
before anything is built: integers are integers (not ``true``, not ``1e14``), paths strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

from jacana.stages.errors import FilesetError, InputFileError, shorten
from jacana.stages.rootfile import open_tree

#: Entries one file may claim: a NanoAOD file holds a few million; 10^9 would be about a terabyte.
#: A larger count is a typo, refused before any chunk list is built (10^12 took 67 s and 2.6 GB).
MAX_FILE_ENTRIES = 10**9
#: Generated events of a (sample, variation), the weights' denominator: JSON's exact integers.
MAX_TOTAL_EVENTS = 2**53
#: A file claiming more entries is checked against its header before its chunks are made (100 chunks
#: of the default size); a smaller claim is checked by the reader, chunk by chunk.
CHECKED_CLAIM = 10**7
MAX_FILESET_BYTES = 256 * 2**20
DEFAULT_TREE = "Events"
NOMINAL_VARIATION = "nominal"


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    nevts: int


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A contiguous entry range of one file of one (sample, variation)."""

    sample: str
    variation: str
    path: str
    entry_start: int
    entry_stop: int
    nevts_total: int  # generated events of the (sample, variation): the weight's denominator

    @property
    def n_events(self) -> int:
        return self.entry_stop - self.entry_start

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.entry_start, self.entry_stop)

    @property
    def store_key(self) -> tuple[str, str, str, int, int]:
        """What a per-chunk cache is keyed by: the sample and variation too (one file may serve several)."""
        return (self.sample, self.variation) + self.key


@dataclasses.dataclass(frozen=True)
class Fileset:
    """process -> variation -> (files, nevts_total), with paths resolved."""

    entries: Mapping[str, Mapping[str, tuple[tuple[FileEntry, ...], int]]]
    source: str = "<dict>"
    metadata: Mapping[str, Mapping[str, Mapping]] = dataclasses.field(default_factory=dict)  # coffea's, per (sample, variation)

    def files(self, sample: str, variation: str) -> tuple[FileEntry, ...]:
        return self._get(sample, variation)[0]

    def nevts_total(self, sample: str, variation: str) -> int:
        return self._get(sample, variation)[1]

    def has(self, sample: str, variation: str) -> bool:
        return sample in self.entries and variation in self.entries[sample]

    def _get(self, sample: str, variation: str):
        if sample not in self.entries:
            raise FilesetError(f"fileset {self.source}: no process {sample!r}; it has {sorted(self.entries)}")
        if variation not in self.entries[sample]:
            raise FilesetError(f"fileset {self.source}: process {sample!r} has no variation {variation!r};"
                               f" it has {sorted(self.entries[sample])}")
        return self.entries[sample][variation]

    def chunks(self, sample: str, variation: str, chunk_size: int = 200_000) -> list[Chunk]:
        """Split every file of (sample, variation) into entry ranges of at most ``chunk_size``."""
        files, total = self._get(sample, variation)
        out = []
        for f in files:
            if f.nevts > CHECKED_CLAIM:  # a large claim costs a long chunk list: the file's header first
                _check_claim(f, f"fileset {self.source}: {sample}/{variation}")
            for start in range(0, f.nevts, chunk_size):
                out.append(Chunk(sample, variation, f.path, start, min(start + chunk_size, f.nevts), total))
        return out

    def split_alternate(self) -> tuple["Fileset", "Fileset"]:
        """(train, held-out): alternate files of every (sample, variation) go to each side.

        Each side's ``nevts_total`` is scaled to the events it keeps, so both are correctly
        normalised estimates of the same sample. Needs at least two files everywhere.
        """
        sides: tuple[dict, dict] = ({}, {})
        for sample, variations in self.entries.items():
            for variation, (files, total) in variations.items():
                if len(files) < 2:
                    raise FilesetError(f"fileset {self.source}: {sample}/{variation} has one file; cannot hold"
                                       " files out for validation (give a separate validation fileset)")
                all_events = sum(f.nevts for f in files) or 1
                for side, part in zip(sides, (files[0::2], files[1::2])):
                    kept = sum(f.nevts for f in part)
                    side.setdefault(sample, {})[variation] = (part, max(1, round(total * kept / all_events)))
        return (Fileset(sides[0], source=f"{self.source} (even files)"),
                Fileset(sides[1], source=f"{self.source} (odd files)"))

    def to_dict(self) -> dict:
        return {s: {v: {"files": [{"path": f.path, "nevts": f.nevts} for f in files], "nevts_total": total}
                    for v, (files, total) in vs.items()} for s, vs in self.entries.items()}


def _check_claim(f: FileEntry, where: str) -> None:
    """Refuse a local file that claims more entries than any of its trees holds (remote files and
    missing ones are left to the reader, which checks every chunk against the tree it reads)."""
    if "://" in f.path or not Path(f.path).is_file():
        return
    import uproot

    try:
        with uproot.open(f.path) as root:
            largest = max((t.num_entries for t in root.values(filter_classname="TTree")), default=0)
    except Exception:  # damaged: the reader names the file and the problem
        return
    if f.nevts > largest:
        raise FilesetError(f"{where}: file {f.path!r} claims nevts {f.nevts:,} but its largest tree has"
                           f" {largest:,} entries (the fileset's nevts is wrong)")


def _where(source: str, *keys) -> str:
    return f"fileset {source}: " + "/".join(str(k) for k in keys)


def _count(value, what: str, lower: int, upper: int, allow_float: bool = False) -> int:
    """``value`` as an integer in [lower, upper], or a message saying what is wrong with it.

    ``bool`` is refused although Python counts it as an int (``nevts: true`` is not 1 event); a
    float is accepted only where ``allow_float`` and only when integral (coffea metadata).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FilesetError(f"{what} must be an integer, got {shorten(repr(value), 80)} ({type(value).__name__})")
    if isinstance(value, float):
        if not allow_float or not math.isfinite(value) or not value.is_integer():
            raise FilesetError(f"{what} must be an integer, got {shorten(repr(value), 80)}")
        value = int(value)
    if not lower <= value <= upper:
        raise FilesetError(f"{what} must be between {lower:,} and {upper:,}, got {value:,}"
                           + (" (more entries than any real file holds: is it a typo?)" if value > upper else ""))
    return value


def _path(value, where: str, base: Path | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FilesetError(f"{where}: 'path' must be a non-empty string, got {shorten(repr(value), 80)}")
    if base is not None and "://" not in value and not Path(value).is_absolute():
        return str((base / value).resolve())
    return value


def _key(value, where: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise FilesetError(f"{where}: {what} names must be non-empty strings, got {shorten(repr(value), 80)}")
    return value


def _agc_block(block, where: str, base: Path | None) -> tuple[tuple[FileEntry, ...], int]:
    """One (process, variation) of the AGC form: ``{"files": [{"path", "nevts"}], "nevts_total"}``."""
    if not isinstance(block, Mapping) or "files" not in block:
        raise FilesetError(f"{where}: needs a 'files' list, got {shorten(repr(block), 80)}")
    listed = block["files"]
    if not isinstance(listed, list):
        raise FilesetError(f"{where}: 'files' must be a list of {{'path': ..., 'nevts': N}},"
                           f" got {shorten(repr(listed), 80)} ({type(listed).__name__})")
    files = []
    for i, f in enumerate(listed):
        if isinstance(f, str):
            raise FilesetError(f"{where}: file {i} ({f!r}) needs an event count: {{'path': ..., 'nevts': N}}")
        if not isinstance(f, Mapping) or "path" not in f or "nevts" not in f:
            raise FilesetError(f"{where}: file {i} must be {{'path': ..., 'nevts': N}}, got {shorten(repr(f), 80)}")
        path = _path(f["path"], f"{where}: file {i}", base)
        nevts = _count(f["nevts"], f"{where}: file {f['path']!r}: nevts", 0, MAX_FILE_ENTRIES)
        files.append(FileEntry(path, nevts))
    if not files:
        raise FilesetError(f"{where}: the file list is empty")
    total = block.get("nevts_total", sum(f.nevts for f in files))
    if total == 0 and "nevts_total" not in block:
        raise FilesetError(f"{where}: every file has nevts 0 ({_file_list(files)}); nothing to analyse")
    total = _count(total, f"{where}: nevts_total", 1, MAX_TOTAL_EVENTS)
    return tuple(files), total


def _file_list(files, limit: int = 5) -> str:
    names = [f.path for f in files[:limit]]
    return ", ".join(names) + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _coffea_files(dataset: str, block: Mapping, source: str, base: Path | None) -> tuple[FileEntry, ...]:
    """The files of one coffea dataset, with their entry counts.

    ``files`` is ``{path: treename}`` (coffea's fileset: the entries are counted by opening each
    file's tree), ``{path: {"object_path", "steps", "num_entries", ...}}`` (dataset_tools'
    preprocessed form: ``num_entries`` is used; ``steps`` must cover entries 0..n contiguously,
    n being what is read) or a list of paths with the dataset's ``treename`` (default ``Events``).
    """
    where = _where(source, dataset)
    listed = block["files"]
    tree = block.get("treename", DEFAULT_TREE)
    if isinstance(listed, list):
        listed = {p: tree for p in listed}
    if not isinstance(listed, Mapping) or not listed:
        raise FilesetError(f"{where}: 'files' must be a non-empty mapping path -> tree name (coffea's form) or"
                           f" path -> {{'object_path', 'steps', 'num_entries'}} (preprocessed), got {shorten(repr(listed), 80)}")
    out = []
    for raw_path, info in listed.items():
        path = _path(raw_path, f"{where}: files", base)
        at = f"{where}: file {raw_path!r}"
        if isinstance(info, str) or info is None:
            out.append(FileEntry(path, _entries_in(path, info or tree, at)))
            continue
        if not isinstance(info, Mapping):
            raise FilesetError(f"{at}: must map to a tree name or to {{'object_path', 'steps', 'num_entries'}},"
                               f" got {shorten(repr(info), 80)}")
        object_path = info.get("object_path", tree)
        if not isinstance(object_path, str) or not object_path:
            raise FilesetError(f"{at}: 'object_path' must be a tree name, got {shorten(repr(object_path), 80)}")
        if "num_entries" not in info:
            out.append(FileEntry(path, _entries_in(path, object_path, at)))
            continue
        if info["num_entries"] is None:
            raise FilesetError(f"{at}: num_entries is null (coffea's preprocess could not open the file);"
                               " remove it from the fileset or preprocess again")
        n = _count(info["num_entries"], f"{at}: num_entries", 0, MAX_FILE_ENTRIES)
        out.append(FileEntry(path, _covered(info.get("steps"), n, at)))
    return tuple(out)


def _covered(steps, num_entries: int, at: str) -> int:
    """The entries ``steps`` cover, which must be 0..n without gaps (jacana makes its own chunks)."""
    if steps is None:
        return num_entries
    if not isinstance(steps, list) or not steps:
        raise FilesetError(f"{at}: 'steps' must be a list of [start, stop] pairs, got {shorten(repr(steps), 80)}")
    stop = 0
    for i, step in enumerate(steps):
        if not (isinstance(step, (list, tuple)) and len(step) == 2):
            raise FilesetError(f"{at}: steps[{i}] must be [start, stop], got {shorten(repr(step), 80)}")
        a = _count(step[0], f"{at}: steps[{i}] start", 0, num_entries)
        b = _count(step[1], f"{at}: steps[{i}] stop", a, num_entries)
        if a != stop:
            raise FilesetError(f"{at}: steps[{i}] starts at {a} but the steps before end at {stop}; jacana reads"
                               " entries 0..n of a file without gaps")
        stop = b
    return stop


def _entries_in(path: str, tree: str, at: str) -> int:
    """The entries of ``tree`` in the file (its header only is read)."""
    try:
        t = open_tree(path, tree)
    except InputFileError as exc:
        raise FilesetError(f"{at}: cannot count its entries: {exc}") from None
    try:
        return _count(int(t.num_entries), f"{at}: entries of {tree!r}", 0, MAX_FILE_ENTRIES)
    finally:
        t.file.close()


#: Metadata keys a coffea dataset is mapped through (the first present wins).
SAMPLE_KEYS = ("sample", "process")
NEVTS_KEYS = ("nevts", "nevts_total")


def _coffea_metadata(dataset: str, block: Mapping, source: str) -> tuple[str, str, int | None, dict]:
    """(sample, variation, nevts or None, the metadata kept) of one coffea dataset."""
    where = _where(source, dataset)
    md = block.get("metadata")
    if md is None:
        md = {}
    if not isinstance(md, Mapping):
        raise FilesetError(f"{where}: 'metadata' must be a mapping, got {shorten(repr(md), 80)}")
    sample = next((md[k] for k in SAMPLE_KEYS if k in md), None)
    if sample is None:
        raise FilesetError(
            f"{where}: metadata has no 'sample' key (nor 'process'): jacana maps each coffea dataset to a sample"
            f" of the analysis config through it, e.g. \"metadata\": {{\"sample\": \"ttbar\", \"variation\":"
            f" \"nominal\", \"nevts\": N}}; it has {sorted(map(str, md)) or 'no metadata'}")
    sample = _key(sample, f"{where}: metadata 'sample'", "sample")
    variation = _key(md.get("variation", NOMINAL_VARIATION), f"{where}: metadata 'variation'", "variation")
    nevts = next((md[k] for k in NEVTS_KEYS if k in md), None)
    if nevts is not None:
        nevts = _count(nevts, f"{where}: metadata 'nevts'", 1, MAX_TOTAL_EVENTS, allow_float=True)
    if "xsec" in md and (isinstance(md["xsec"], bool) or not isinstance(md["xsec"], (int, float))
                         or not math.isfinite(md["xsec"]) or md["xsec"] <= 0):
        raise FilesetError(f"{where}: metadata 'xsec' must be a positive number, got {shorten(repr(md['xsec']), 80)}")
    return sample, variation, nevts, dict(md)


def is_coffea_form(raw: Mapping) -> bool:
    """Whether a fileset mapping is coffea's ``{dataset: {"files": ...}}`` rather than the AGC's."""
    return any(isinstance(v, Mapping) and "files" in v for v in raw.values())


def _parse_coffea(raw: Mapping, base: Path | None, source: str) -> Fileset:
    entries: dict = {}
    metadata: dict = {}
    origin: dict = {}
    for dataset, block in raw.items():
        dataset = _key(dataset, f"fileset {source}", "dataset")
        if not isinstance(block, Mapping) or "files" not in block:
            raise FilesetError(f"{_where(source, dataset)}: every dataset of a coffea fileset needs 'files'"
                               f" (the other datasets have it), got {shorten(repr(block), 80)}")
        listed = block["files"]
        if isinstance(listed, list) and listed and all(isinstance(f, Mapping) for f in listed):
            raise FilesetError(f"{_where(source, dataset)}: 'files' lists {{'path', 'nevts'}} entries directly under"
                               f" {dataset!r}; the AGC form has a variation level: {{{dataset!r}: {{'nominal':"
                               " {'files': [...]}}}, and coffea's maps paths to tree names")
        sample, variation, nevts, md = _coffea_metadata(dataset, block, source)
        if (sample, variation) in origin:
            raise FilesetError(f"fileset {source}: datasets {origin[sample, variation]!r} and {dataset!r} are both"
                               f" {sample}/{variation} (metadata 'sample' and 'variation'); give each its own")
        origin[sample, variation] = dataset
        files = _coffea_files(dataset, block, source, base)
        total = sum(f.nevts for f in files) if nevts is None else nevts
        if total <= 0:
            raise FilesetError(f"{_where(source, dataset)}: every file is empty ({_file_list(files)}) and the"
                               " metadata has no 'nevts'; nothing to analyse")
        entries.setdefault(sample, {})[variation] = (files, total)
        metadata.setdefault(sample, {})[variation] = {"dataset": dataset, **md}
    return Fileset(entries, source=source, metadata=metadata)


def parse_fileset(raw: Mapping[str, Any], base: Path | None = None, source: str = "<dict>") -> Fileset:
    """Validate a fileset mapping and resolve its relative paths against ``base``.

    Two forms: the AGC's ``process -> variation -> {"files": [{"path", "nevts"}], "nevts_total"}``
    and coffea's ``dataset -> {"files": ..., "metadata": {"sample", "variation", "nevts", "xsec"}}``
    (plain or preprocessed by ``coffea.dataset_tools``). Every error names the fileset and the key.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise FilesetError(f"fileset {source}: must be a non-empty mapping process -> variation -> files"
                           f" (or coffea's dataset -> {{'files', 'metadata'}}), got {shorten(repr(raw), 80)}")
    if is_coffea_form(raw):
        return _parse_coffea(raw, base, source)
    entries: dict = {}
    for sample, variations in raw.items():
        sample = _key(sample, f"fileset {source}", "process")
        if not isinstance(variations, Mapping) or not variations:
            raise FilesetError(f"{_where(source, sample)}: process {sample!r} must map variations to files,"
                               f" got {shorten(repr(variations), 80)}")
        entries[sample] = {}
        for variation, block in variations.items():
            variation = _key(variation, _where(source, sample), "variation")
            entries[sample][variation] = _agc_block(block, _where(source, sample, variation), base)
    return Fileset(entries, source=source)


def load_fileset(path: str | Path | Mapping) -> Fileset:
    """Read a fileset JSON file (AGC or coffea form; see :func:`parse_fileset`), or parse a mapping."""
    if isinstance(path, Mapping):
        return parse_fileset(path)
    path = Path(path)
    if not path.is_file():
        raise FilesetError(f"fileset {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > MAX_FILESET_BYTES:
        raise FilesetError(f"fileset {str(path)!r} has {size:,} bytes; at most {MAX_FILESET_BYTES:,} are read")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FilesetError(f"fileset {str(path)!r} is not valid JSON: {exc}") from None
    except RecursionError:  # the C decoder recurses per level: "[[[[..." 100k deep
        raise FilesetError(f"fileset {str(path)!r} is nested too deeply (a fileset has at most 5 levels)") from None
    except UnicodeDecodeError as exc:
        raise FilesetError(f"fileset {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_fileset(raw, base=path.parent.resolve(), source=str(path))
