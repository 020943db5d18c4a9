"""Filesets in the shape of the AGC's ``nanoaod_inputs.json`` and their split into chunks.

A fileset maps process -> variation -> ``{"files": [{"path", "nevts"}], "nevts_total"}``.
Relative paths are resolved against the fileset file's folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from jacana.stages.errors import FilesetError


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


def parse_fileset(raw: Mapping[str, Any], base: Path | None = None, source: str = "<dict>") -> Fileset:
    """Validate a fileset mapping and resolve its relative paths against ``base``."""
    if not isinstance(raw, Mapping) or not raw:
        raise FilesetError(f"fileset {source}: must be a non-empty mapping process -> variation -> files")
    entries: dict = {}
    for sample, variations in raw.items():
        if not isinstance(variations, Mapping) or not variations:
            raise FilesetError(f"fileset {source}: process {sample!r} must map variations to files")
        entries[sample] = {}
        for variation, block in variations.items():
            where = f"fileset {source}: {sample}/{variation}"
            if not isinstance(block, Mapping) or "files" not in block:
                raise FilesetError(f"{where}: needs a 'files' list")
            files = []
            for i, f in enumerate(block["files"]):
                if isinstance(f, str):
                    raise FilesetError(f"{where}: file {i} ({f!r}) needs an event count: {{'path': ..., 'nevts': N}}")
                if not isinstance(f, Mapping) or "path" not in f or "nevts" not in f:
                    raise FilesetError(f"{where}: file {i} must be {{'path': ..., 'nevts': N}}, got {f!r}")
                nevts = f["nevts"]
                if not isinstance(nevts, int) or nevts < 0:
                    raise FilesetError(f"{where}: file {f['path']!r} has invalid nevts {nevts!r}")
                path = str(f["path"])
                if base is not None and "://" not in path and not Path(path).is_absolute():
                    path = str((base / path).resolve())
                files.append(FileEntry(path, nevts))
            if not files:
                raise FilesetError(f"{where}: the file list is empty")
            total = block.get("nevts_total", sum(f.nevts for f in files))
            if not isinstance(total, int) or total <= 0:
                raise FilesetError(f"{where}: nevts_total must be a positive integer, got {total!r}")
            entries[sample][variation] = (tuple(files), total)
    return Fileset(entries, source=source)


def load_fileset(path: str | Path) -> Fileset:
    """Read an AGC-style fileset JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FilesetError(f"fileset {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FilesetError(f"fileset {str(path)!r} is not valid JSON: {exc}") from None
    return parse_fileset(raw, base=path.parent.resolve(), source=str(path))
