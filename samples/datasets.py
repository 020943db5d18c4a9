"""The embedded default dataset: synthetic AGC samples, generated into a cache on first use.

Two independent samples are used: one to optimise on (``seed`` 1) and one, never seen by the
optimiser, to validate on (``seed`` 2). The cache lives in ``$JACANA_CACHE`` (default
``~/.cache/jacana``); a sample is complete once its ``fileset.json`` exists (written last,
atomically), so an interrupted generation is simply redone.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_EVENTS = 1_000_000
#: Events the optimiser runs on by default: a gradient step costs several soft passes, and the
#: 2-core budget of the main job is minutes; validation always uses DEFAULT_EVENTS.
DEFAULT_TRAIN_EVENTS = 250_000
SEEDS = {"optimize": 1, "validate": 2}


def cache_dir() -> Path:
    return Path(os.environ.get("JACANA_CACHE", Path.home() / ".cache" / "jacana"))


def default_fileset(role: str = "optimize", events: int = DEFAULT_EVENTS, progress: bool = True) -> Path:
    """Path of the synthetic fileset for ``role`` ("optimize" or "validate"), generated if absent."""
    from jacana.samples.synthetic import GENERATOR_VERSION, generate

    if role not in SEEDS:
        raise ValueError(f"role must be one of {sorted(SEEDS)}, got {role!r}")
    seed = SEEDS[role]
    out = cache_dir() / "synthetic" / f"agc_v{GENERATOR_VERSION}_seed{seed}_events{events}"
    fileset = out / "fileset.json"
    if not fileset.is_file():
        if progress:
            print(f"jacana: generating {events:,} synthetic AGC events (seed {seed}) into {out}", flush=True)
        generate(out, events=events, seed=seed, progress=progress)
    return fileset
