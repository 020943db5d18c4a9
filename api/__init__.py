"""jacana: a differentiable statistical-analysis pipeline for high-energy physics.

The Python API (the ``jacana`` command is built on it)::

    import jacana
    from jacana.samples.synthetic import generate

    analysis = jacana.load_analysis(jet_pt_min=30)          # the AGC ttbar config, one cut changed
    fileset = jacana.load_fileset(generate("samples", events=50_000, progress=False))
    evaluation = jacana.evaluate(analysis, fileset)          # hard cuts, pyhf fit
    evaluation.histograms["4j2b"]                            # a hist.Hist: process x variation x m_bjj
    result = jacana.optimize(analysis, fileset, steps=5)     # the cuts, optimised end to end
    result.params, result.after["expected"]["sigma_mu"]

Everything here is imported on first use: ``import jacana.stages.spec`` (a dask worker's import)
loads this file first and must stay cheap.
"""

from __future__ import annotations

import importlib

#: public name -> the module of this package that defines it
_EXPORTS = {
    "load_analysis": "jacana.core", "load_fileset": "jacana.core", "evaluate": "jacana.core",
    "optimize": "jacana.core", "EvaluationResult": "jacana.core", "OptimizationResult": "jacana.core",
    "read_histograms": "jacana.analysis.evaluate",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name == "__version__":  # the installed distribution's (``jacana --version`` prints it too)
        from importlib.metadata import PackageNotFoundError, version

        try:
            globals()["__version__"] = version("jacana")
        except PackageNotFoundError:
            globals()["__version__"] = "unknown (not installed)"
        return globals()["__version__"]
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'jacana' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
