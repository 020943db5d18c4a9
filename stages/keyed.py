"""The events of several (sample, file variation) keys in one fixed-shape call.

On an accelerator a gradient step should be a few large programs: every file of one kind (the
nominal files, with their kinematic and weight variations, or the alternative-variation files)
runs the same program on a jet bucket, whatever its sample. A :class:`KeyedBatch` holds such a
group: one dense batch (:class:`~.batch.EventBatch` or :class:`~.dense.DenseBatch`) of every key's
events and each event's key. :func:`~.analysis.soft_yields` of it gives every key's histograms at
once, with the key axis first (``[keys, variations, bins]``): each event's weight goes into its
key's column of the histogram fill (:func:`key_weights`), so the event arithmetic is shared and
only the fill's small matrix product grows with the number of keys.

:func:`jacana.facility.executor.resident_calls` builds them (on accelerators);
:class:`~.soft_stage.SoftYieldsStage` splits their results by key.

>>> import numpy as np
>>> key_weights(np.array([2.0, 3.0, 0.0]), np.array([1, 0, 0]), 2).tolist()
[[0.0, 2.0], [3.0, 0.0], [0.0, 0.0]]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Key = tuple[str, str]  # (sample, file variation)


def key_weights(weight, key_index, n_keys: int):
    """Per event and key, the event's weight in its key's column and 0 elsewhere: [N] -> [N, n_keys]."""
    onehot = jnp.asarray(key_index)[:, None] == jnp.arange(n_keys)
    return jnp.where(onehot, jnp.asarray(weight)[:, None], jnp.zeros((), jnp.asarray(weight).dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyedBatch:
    """One dense ``batch`` of the events of ``keys`` (one file kind, one object bucket);
    ``key_index`` [N] is each event's position in ``keys`` (padded events: 0, with weight 0)."""

    batch: Any
    key_index: Any
    keys: tuple = dataclasses.field(default=(), metadata=dict(static=True))

    def __post_init__(self):
        if len(self.keys) < 1 or any(len(k) != 2 for k in self.keys):
            raise ValueError(f"keys must be (sample, file variation) pairs, got {self.keys!r}")

    # what callers of a plain batch read: the inner batch's
    @property
    def n_padded(self) -> int:
        return self.batch.n_padded

    @property
    def block_size(self) -> int:
        return self.batch.block_size

    @property
    def dtype(self):
        return self.batch.dtype

    @property
    def kinematic(self) -> tuple:
        return self.batch.kinematic

    @property
    def weight_variations(self) -> bool:
        return self.batch.weight_variations

    @property
    def bucket_width(self) -> int:
        return self.batch.bucket_width

    @property
    def weight(self):
        return self.batch.weight

    @property
    def event_mask(self):
        return self.batch.event_mask

    def keyed_events(self):
        """The inner batch with its weight as [N, keys] (:func:`key_weights`): what the analysis of one
        block fills histograms from, every key in its own column."""
        return dataclasses.replace(self.batch, weight=key_weights(self.batch.weight, self.key_index, len(self.keys)))


def call_keys(call, key: Key) -> tuple[Key, ...]:
    """The keys a call's results belong to: a :class:`KeyedBatch`'s own, else the ``key`` it is listed under."""
    return tuple(call.keys) if isinstance(call, KeyedBatch) else (tuple(key),)


def split_by_key(call, tree) -> list:
    """A call's result tree as one tree per key of :func:`call_keys` (a :class:`KeyedBatch`'s leaves
    carry the key axis first; a plain batch's result is its one key's)."""
    if not isinstance(call, KeyedBatch):
        return [tree]
    return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(len(call.keys))]
