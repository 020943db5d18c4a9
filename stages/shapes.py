"""How events are grouped and padded into fixed shapes: object-multiplicity buckets, processing
blocks, and the per-chunk container of dense batches (AGC :class:`~.batch.EventBatch` or general
:class:`~.dense.DenseBatch` parts). Few shapes means few compilations; blocks bound the memory.
"""

from __future__ import annotations

import dataclasses
import math

JET_BUCKETS_MIN = 4
#: Target number of (event x trijet) elements per processing block (bounds temporary memory).
BLOCK_ELEMENTS = 1 << 16  # ~0.5 MB per float64 array: stays in cache
MIN_BLOCK = 128
#: Precisions of the dense event batches: float64, or float32 event arithmetic with float64 histogram
#: sums (mixed precision: :data:`jacana.stages.analysis.ACCUMULATOR_DTYPE`, docs/bench.md figure 9).
BATCH_DTYPES = ("float64", "float32")


def jet_bucket(n: int, minimum: int = JET_BUCKETS_MIN) -> int:
    """Smallest bucket size >= n from 4, 6, 8, 12, 16, 24, 32, 48, ... (2^k and 3 x 2^(k-1))."""
    size = minimum
    while size < n:
        size = _next_size(size)
    return size


def _next_size(size: int) -> int:
    p = 1 << (size.bit_length() - 1)
    return p * 3 // 2 if size == p and p >= 4 else (p * 2)


def nice_size(n: int, minimum: int = 1) -> int:
    """Smallest number >= n (and >= minimum) of the form 2^k or 3 x 2^(k-1)."""
    n = max(n, minimum, 1)
    p = 1 << (n - 1).bit_length()  # next power of two
    three = (p // 4) * 3
    return three if p >= 4 and three >= n else p


def block_size_for(n_jets: int, *, elements: int = BLOCK_ELEMENTS, min_per_event: int = 1) -> int:
    """Events per processing block for a jet bucket: about ``elements`` event x trijet elements
    (a power of two, at least MIN_BLOCK), counting each event as at least ``min_per_event``
    elements. The defaults are the CPU's (cache-sized blocks); :mod:`jacana.facility.devices`
    passes larger budgets on accelerators."""
    n_trijets = max(math.comb(n_jets, 3), min_per_event, 1)
    b = max(MIN_BLOCK, elements // n_trijets)
    return 1 << (b.bit_length() - 1)


def padded_events(n: int, block: int) -> tuple[int, int]:
    """(padded event count, block size): one block of ``nice_size(n)`` if small, else whole blocks."""
    if n <= block:
        size = nice_size(n, MIN_BLOCK)
        return size, size
    return nice_size(-(-n // block)) * block, block


@dataclasses.dataclass(frozen=True)
class ChunkBatches:
    """The dense batches of one chunk of one (sample, file variation)."""

    sample: str
    variation: str  # the file variation: "nominal", "ME_var", ...
    n_events: int  # events of the chunk (before padding and prefiltering)
    parts: tuple  # EventBatch or DenseBatch parts, one per bucket
    #: per part, the chunk indices of its real (unpadded) events, in the part's order; () where not kept
    rows: tuple = ()

    @property
    def n_padded(self) -> int:
        return sum(p.n_padded for p in self.parts)
