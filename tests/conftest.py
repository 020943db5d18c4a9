"""Shared fixtures: the real NanoAOD file (through scikit-hep-testdata) and small synthetic samples."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REAL_FILE = "nanoAOD_2015_CMS_Open_Data_ttbar.root"


@pytest.fixture(scope="session")
def real_nanoaod() -> str:
    """Path of the real 200-event AGC NanoAOD file (downloaded or from the seeded cache)."""
    skhep_testdata = pytest.importorskip("skhep_testdata")
    return skhep_testdata.data_path(REAL_FILE)


@pytest.fixture(scope="session")
def small_fileset(tmp_path_factory):
    """A small synthetic AGC dataset (about 60k events), generated once per test session."""
    from jacana.facility.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    return generate(out, events=60_000, seed=7, progress=False)
