"""Shared fixtures: the real NanoAOD file (through scikit-hep-testdata) and small synthetic samples."""

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


def pytest_configure(config):
    from jacana.facility.jaxsetup import configure_jax

    configure_jax()  # x64 and the session's persistent compile cache, for in-process tests too
