"""Shared fixtures: the real NanoAOD file (through scikit-hep-testdata), small synthetic samples and an
executor over one of them (generated, read and compiled once per session)."""

from __future__ import annotations

import os

import pytest

import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compile cache for the whole session (in-process runs, subprocesses,
# notebook kernels and dask workers all inherit it): the soft analysis compiles the same
# fixed-shape programs everywhere, and compiling dominates the suite's time on 2 cores.
os.environ.setdefault("JACANA_CACHE", tempfile.mkdtemp(prefix="jacana-test-cache-"))

REAL_FILE = "nanoAOD_2015_CMS_Open_Data_ttbar.root"


@pytest.fixture(scope="session")
def real_nanoaod() -> str:
    """Path of the real 200-event AGC NanoAOD file (downloaded or from the seeded cache)."""
    skhep_testdata = pytest.importorskip("skhep_testdata")
    return skhep_testdata.data_path(REAL_FILE)


@pytest.fixture(scope="session")
def small_fileset(tmp_path_factory):
    """A small synthetic AGC dataset (about 60k events), generated once per test session."""
    from jacana.samples.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    return generate(out, events=60_000, seed=7, progress=False)


@pytest.fixture(scope="session")
def small_fileset_evaluated(small_fileset, tmp_path_factory):
    """``jacana evaluate`` of ``small_fileset`` at the config's cuts: the folder with its result.json,
    histograms.json and workspace.json."""
    from jacana.cli.main import main

    out = tmp_path_factory.mktemp("evaluate")
    assert main(["evaluate", "--fileset", str(small_fileset), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def train_validate_20k(tmp_path_factory):
    """Two independent synthetic datasets of 20k events, one file per (sample, variation) (a hard pass
    costs per chunk): events to optimise on (seed 11) and held-out events (seed 32), generated once per
    session for the scan and baseline tests. Seeds whose AGC point has a finite sigma_mu (20k events are few)."""
    from jacana.samples.synthetic import generate

    out = tmp_path_factory.mktemp("train_validate_20k")
    return (generate(out / "train", events=20_000, seed=11, files_per_sample=1, progress=False),
            generate(out / "validate", events=20_000, seed=32, files_per_sample=1, progress=False))


@pytest.fixture(scope="session")
def reference_sample(tmp_path_factory) -> dict:
    """8k synthetic events (seed 11) in chunks of 1500 events, held by an in-process executor, with its
    yields and Jacobians at the AGC point: the reference of the executor tests (dask, coffea, the chain).

    Keys: spec, fileset, chunks, params, relax, ref (the executor: do not close it), y0, j0."""
    from jacana.facility.executor import InProcessExecutor
    from jacana.facility.hardrun import analysis_chunks
    from jacana.samples.synthetic import generate
    from jacana.stages.analysis import default_params, default_relax
    from jacana.stages.fileset import load_fileset
    from jacana.stages.spec import load_spec

    path = generate(tmp_path_factory.mktemp("reference_sample"), events=8_000, seed=11, progress=False)
    spec, fileset = load_spec(), load_fileset(path)
    chunks = analysis_chunks(spec, fileset, chunk_size=1500)
    params, relax = default_params(spec), default_relax(spec)
    ref = InProcessExecutor(spec, chunks)
    y0, j0 = ref.yields_and_jacobian(params, relax)
    yield {"spec": spec, "fileset": fileset, "chunks": chunks, "params": params, "relax": relax, "ref": ref,
           "y0": y0, "j0": j0}
    ref.close()


def pytest_configure(config):
    from jacana.facility.jaxsetup import configure_jax

    configure_jax()  # x64 and the session's persistent compile cache, for in-process tests too
