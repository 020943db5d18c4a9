"""JAX settings for jacana processes (the CLI, notebooks, dask workers): one place, explicit.

- 64-bit floats: likelihoods of 10^5 events and hard-limit parity need them.
- A persistent compilation cache (``$JACANA_CACHE/xla``): the soft analysis compiles one
  program per jet-multiplicity bucket, which takes minutes on a small CPU; later runs (and
  ``--resume``) reuse them.
- No GPU memory preallocation (``XLA_PYTHON_CLIENT_PREALLOCATE=false``) so several workers can
  share a GPU; this must be set before JAX initialises a backend.
"""

from __future__ import annotations

import os

from jacana.samples.datasets import cache_dir


def configure_jax(compilation_cache: bool = True) -> dict:
    """Apply jacana's JAX settings to this process; returns what was set."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    jax.config.update("jax_enable_x64", True)
    settings = {"jax_enable_x64": True, "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]}
    if compilation_cache and os.environ.get("JACANA_NO_COMPILATION_CACHE") != "1":
        path = cache_dir() / "xla"
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        settings["jax_compilation_cache_dir"] = str(path)
    return settings
