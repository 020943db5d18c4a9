"""The embedded default dataset: synthetic AGC samples, generated into a cache on first use.

Two independent samples are used: one to optimise on (``seed`` 1) and one, never seen by the
optimiser, to validate on (``seed`` 2). The cache lives in ``$JACANA_CACHE`` (default
``~/.cache/jacana``); a sample is complete once its ``fileset.json`` exists (written last,
atomically), so an interrupted generation is simply redone.

Each preset of the generator (``jacana.samples.synthetic.PRESETS``) has caches of its own
(``{preset}_v{version}_seed{seed}_events{events}``). The "agc" caches keep the name they had before
presets and MET existed, so caches written by generator 1.1.0 before MET still serve: their
branches are bit-identical to a new generation's, only ``MET_pt``/``MET_phi`` are missing, and the
AGC analysis reads no MET. Code that needs MET from an "agc" cache checks ``has_met`` (or uses
``default_fileset(..., require_met=True)``, which regenerates such a cache in place).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_EVENTS = 1_000_000
#: Events the optimiser runs on by default: a gradient step costs several soft passes, and the
#: 2-core budget of the main job is minutes; validation always uses DEFAULT_EVENTS.
DEFAULT_TRAIN_EVENTS = 250_000
SEEDS = {"optimize": 1, "validate": 2}


def cache_dir() -> Path:
    return Path(os.environ.get("JACANA_CACHE", Path.home() / ".cache" / "jacana"))


def has_met(fileset: str | Path) -> bool:
    """Whether the synthetic samples behind ``fileset`` have the MET branches (generator.json says so)."""
    try:
        meta = json.loads((Path(fileset).parent / "generator.json").read_text())
    except (OSError, ValueError):
        return False
    return "MET_pt" in meta.get("met", {}).get("branches", ())


def default_fileset(role: str = "optimize", events: int = DEFAULT_EVENTS, progress: bool = True,
                    preset: str = "agc", require_met: bool = False) -> Path:
    """Path of the synthetic fileset of ``preset`` for ``role`` ("optimize" or "validate"), generated
    if absent (or, with ``require_met``, if it was generated before the MET branches existed)."""
    from jacana.samples.synthetic import GENERATOR_VERSION, PRESETS, generate

    if role not in SEEDS:
        raise ValueError(f"role must be one of {sorted(SEEDS)}, got {role!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    seed = SEEDS[role]
    out = cache_dir() / "synthetic" / f"{preset}_v{GENERATOR_VERSION}_seed{seed}_events{events}"
    fileset = out / "fileset.json"
    if not fileset.is_file() or (require_met and not has_met(fileset)):
        if progress:
            what = "AGC" if preset == "agc" else f"{preset!r} preset"
            print(f"jacana: generating {events:,} synthetic {what} events (seed {seed}) into {out}", flush=True)
        if fileset.is_file():
            fileset.unlink()  # regenerated in place: incomplete until the new fileset.json is written
        generate(out, events=events, seed=seed, progress=progress, preset=preset)
    return fileset
