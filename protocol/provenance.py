"""Provenance of additive partial results, and the checks made before summing them.

A partial result (yields, Jacobians or VJPs from one chunk of events) carries
the chunks it covers. Before partials are summed, :func:`merge` checks that no
chunk is counted twice, that no two chunks overlap, and (given the expected
chunk list) that none is missing or unexpected::

    >>> a = Provenance("ttbar.root", 0, 100, 100)
    >>> b = Provenance("ttbar.root", 100, 250, 150)
    >>> merge([[a], [b]], expected=[a, b]) == (a, b)
    True
    >>> merge([[a], [a]])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    ProvenanceError: chunk ttbar.root[0:100] appears 2 times
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from jacana.protocol.errors import MalformedMessage, ProvenanceError

_MAX_INT = 2**53 - 1  # exactly representable in every JSON implementation


@dataclass(frozen=True, order=True)
class Provenance:
    """One chunk: ``file``, entries ``[entry_start, entry_stop)``, events processed."""

    file: str
    entry_start: int
    entry_stop: int
    n_events: int

    def __post_init__(self) -> None:
        if not isinstance(self.file, str) or not self.file or len(self.file) > 4096:
            raise MalformedMessage(f"provenance file must be a non-empty string, got {self.file!r}")
        for field in ("entry_start", "entry_stop", "n_events"):
            value = getattr(self, field)
            if type(value) is not int or not 0 <= value <= _MAX_INT:
                raise MalformedMessage(
                    f"provenance {field} must be an integer in [0, 2**53), got {value!r}"
                )
        if self.entry_stop < self.entry_start:
            raise MalformedMessage(
                f"provenance {self.label}: entry_stop < entry_start"
            )
        if self.n_events > self.entry_stop - self.entry_start:
            raise MalformedMessage(
                f"provenance {self.label}: n_events={self.n_events} exceeds the entry range"
            )

    @property
    def label(self) -> str:
        return f"{self.file}[{self.entry_start}:{self.entry_stop}]"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "entry_start": self.entry_start,
            "entry_stop": self.entry_stop,
            "n_events": self.n_events,
        }

    @classmethod
    def from_json(cls, obj: Any) -> "Provenance":
        if not isinstance(obj, Mapping) or set(obj) != {"file", "entry_start", "entry_stop", "n_events"}:
            raise MalformedMessage(
                "provenance record must be an object with exactly file, entry_start, entry_stop, n_events"
            )
        return cls(obj["file"], obj["entry_start"], obj["entry_stop"], obj["n_events"])


def merge(
    partials: Iterable[Sequence[Provenance]],
    expected: Sequence[Provenance] | None = None,
) -> tuple[Provenance, ...]:
    """Union of the partials' chunks, sorted; raise :class:`ProvenanceError` on
    duplicates, overlaps, and (with ``expected``) missing or unexpected chunks."""
    records = [p for part in partials for p in part]
    counts = Counter(records)
    dups = sorted(p for p, n in counts.items() if n > 1)
    if dups:
        raise ProvenanceError(
            "; ".join(f"chunk {p.label} appears {counts[p]} times" for p in dups)
        )
    merged = tuple(sorted(records))
    reach: Provenance | None = None  # the non-empty chunk reaching furthest so far, same file
    for cur in merged:
        if cur.entry_start == cur.entry_stop:
            continue  # an empty range overlaps nothing
        if reach is not None and reach.file == cur.file and cur.entry_start < reach.entry_stop:
            raise ProvenanceError(f"chunks {reach.label} and {cur.label} overlap")
        if reach is None or reach.file != cur.file or cur.entry_stop > reach.entry_stop:
            reach = cur
    if expected is not None:
        want = set(expected)
        got = set(merged)
        missing = sorted(want - got)
        extra = sorted(got - want)
        problems = []
        if missing:
            problems.append("missing chunks: " + ", ".join(p.label for p in missing))
        if extra:
            problems.append("unexpected chunks: " + ", ".join(p.label for p in extra))
        if problems:
            raise ProvenanceError("; ".join(problems))
    return merged
