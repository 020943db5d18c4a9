"""Facility profiles: schema, no credentials, connection paths (gateway/jobqueue faked), worker plugin."""

from __future__ import annotations

import sys
import types

import pytest

from jacana.facility.plugin import JacanaWorkerPlugin, local_versions
from jacana.facility.profiles import (FacilityError, announce_dashboard, available_profiles, connect,
                                      dashboard_address, load_profile, plugin_for, validate_profile)


def test_shipped_profiles_are_valid():
    names = available_profiles()
    assert {"local", "coffea-casa", "fermilab-eaf", "purdue-af", "htcondor-gpu"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p["kind"] in ("local", "scheduler", "gateway", "htcondor") and p["device"] in ("cpu", "gpu")
    gpu = load_profile("htcondor-gpu")
    assert gpu["job_extra_directives"]["request_GPUs"] == 1 and gpu["worker_extra_args"] == ["--resources", "GPU=1"]
    assert load_profile("coffea-casa")["address"].startswith("tls://")


@pytest.mark.parametrize("raw, match", [
    ({"kind": "cloud"}, "kind must be one of"),
    ({"kind": "local", "wrokers": 2}, "unknown key 'wrokers'"),
    ({"kind": "local", "workers": "two"}, "workers must be int"),
    ({"kind": "local", "workers": 0}, "workers must be >= 1"),
    ({"kind": "local", "device": "tpu"}, "device must be one of"),
    ({"kind": "scheduler"}, "needs address or address_env"),
    ({"kind": "gateway", "api_token": "abc"}, "look like credentials"),
    ({"kind": "gateway", "cluster_options": {"password": "x"}}, "look like credentials"),
    ({"kind": "local", "worker": {"threads": "1"}}, "worker.threads must be"),
])
def test_schema_errors_name_the_problem(raw, match):
    with pytest.raises(FacilityError, match=match):
        validate_profile(raw)


def test_dashboard_is_on_by_default_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv("JACANA_DASHBOARD", raising=False)
    assert dashboard_address(load_profile("local")) == ":0"  # a free port: two runs never collide
    assert dashboard_address(load_profile("local", dashboard=False)) is None
    assert dashboard_address(load_profile("local", dashboard=":8787")) == ":8787"
    monkeypatch.setenv("JACANA_DASHBOARD", "0")  # tests, CI: off where the profile does not say
    assert dashboard_address(load_profile("local")) is None
    assert dashboard_address(load_profile("local", dashboard=True)) == ":0"
    monkeypatch.setenv("JACANA_DASHBOARD", "127.0.0.1:0")
    assert dashboard_address(load_profile("local")) == "127.0.0.1:0"
    with pytest.raises(FacilityError, match="dashboard must be bool or str"):
        validate_profile({"kind": "local", "dashboard": 8787})


def test_local_cluster_serves_its_dashboard_and_the_link_is_printed_once(monkeypatch, capsys):
    import urllib.request

    monkeypatch.delenv("JACANA_DASHBOARD", raising=False)
    client, cluster = connect({"kind": "local", "workers": 1, "processes": False})
    try:
        link = announce_dashboard(client)
        assert announce_dashboard(client) == link
        with urllib.request.urlopen(link, timeout=10) as page:  # the dashboard itself, not the bare HTTP server
            assert page.status == 200
    finally:
        client.close()
        cluster.close()
    assert capsys.readouterr().err.count("dask dashboard: http://") == 1


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(FacilityError, match="coffea-casa"):
        load_profile("nowhere")


def test_overrides_and_env_address(monkeypatch):
    assert load_profile("local", workers=3, device=None)["workers"] == 3
    monkeypatch.delenv("JACANA_TEST_SCHED", raising=False)
    with pytest.raises(FacilityError, match=r"\$JACANA_TEST_SCHED"):
        connect({"kind": "scheduler", "address_env": "JACANA_TEST_SCHED"})


def test_missing_optional_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_gateway", None)  # import fails
    with pytest.raises(FacilityError, match="pip install dask-gateway"):
        connect("fermilab-eaf")
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(FacilityError, match="pip install dask-jobqueue"):
        connect("htcondor-gpu")


def test_gateway_profile_uses_the_environment_for_auth(monkeypatch):
    calls = {}

    class Cluster:
        def scale(self, n):
            calls["scale"] = n

        def get_client(self, set_as_default=False):
            return "client"

    class Gateway:
        def __init__(self, **kwargs):
            calls["gateway"] = kwargs

        def new_cluster(self, **options):
            calls["options"] = options
            return Cluster()

    monkeypatch.setitem(sys.modules, "dask_gateway", types.SimpleNamespace(Gateway=Gateway))
    client, cluster = connect("purdue-af", workers=5)
    assert client == "client" and calls["scale"] == 5
    assert calls["gateway"] == {"auth": "jupyterhub"}  # no token passed: dask-gateway reads it from the environment


def test_htcondor_gpu_profile_requests_gpus(monkeypatch):
    seen = {}

    class HTCondorCluster:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def scale(self, jobs):
            seen["jobs"] = jobs

    monkeypatch.setitem(sys.modules, "dask_jobqueue", types.SimpleNamespace(HTCondorCluster=HTCondorCluster))
    import distributed

    monkeypatch.setattr(distributed, "Client", lambda cluster, set_as_default=False: "client")
    client, cluster = connect("htcondor-gpu", workers=2)
    assert seen["job_extra_directives"]["request_GPUs"] == 1
    assert seen["worker_extra_args"] == ["--resources", "GPU=1"] and seen["jobs"] == 2


def test_plugin_checks_versions_and_device(monkeypatch):
    import os

    for k in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE"):  # restored after the test
        monkeypatch.setenv(k, os.environ.get(k, "cpu" if k == "JAX_PLATFORMS" else "false"))
    plugin = plugin_for(load_profile("local"))
    assert isinstance(plugin, JacanaWorkerPlugin) and plugin.device == "cpu"
    plugin.compilation_cache = False  # leave this process's JAX cache settings alone
    plugin.setup(None)  # same process: same versions, CPU present
    other = JacanaWorkerPlugin(versions=dict(local_versions(), jax="0.0.1"), compilation_cache=False)
    with pytest.raises(FacilityError, match="jax 0.0.1 on the driver"):
        other.setup(None)
    assert JacanaWorkerPlugin(threads=1).environment()["OMP_NUM_THREADS"] == "1"
    with pytest.raises(FacilityError, match="device must be"):
        JacanaWorkerPlugin(device="tpu")


_MMAP_PROBE = """
import ctypes, numpy as np
from jacana.facility.plugin import raise_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_after_allocating():
    before = libc.mallinfo2().hblks
    arrays = [np.ones(2**17) for _ in range(8)]  # 1 MiB each, as a chunk's column arrays
    return libc.mallinfo2().hblks - before

print(mmapped_after_allocating(), raise_mmap_threshold(), mmapped_after_allocating())
"""


def _has_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc malloc tuning")
def test_worker_arrays_come_from_the_heap_not_fresh_mmaps():
    """Under dask's MALLOC_TRIM_THRESHOLD_ glibc mmaps every array above 128 KiB; the worker
    plugin's raise_mmap_threshold makes such arrays heap allocations again."""
    import os
    import subprocess

    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _MMAP_PROBE], env=env, capture_output=True, text=True, check=True)
    before, accepted, after = out.stdout.split()
    assert (int(before), accepted, int(after)) == (8, "True", 0)


@pytest.mark.slow  # builds jacana into a folder (pip) and starts a worker process twice (the plugin restarts it)
def test_upload_directory_puts_jacana_on_a_worker(tmp_path):
    """docs/facility.md, "Getting jacana onto the workers", option 3: a built tree sent with dask's
    UploadDirectory is what the restarted worker imports."""
    import os
    import subprocess

    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import UploadDirectory

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site = tmp_path / "jacana-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), root], check=True, capture_output=True)
    assert (site / "jacana" / "stages" / "spec.py").is_file()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(UploadDirectory(str(site), update_path=True, restart_workers=True))

        def where():
            import jacana.stages.spec

            return jacana.stages.spec.__file__

        (path,) = client.run(where).values()
    # the worker's copy of the upload (in its scratch space), not the installed checkout
    assert os.path.join("jacana-site", "jacana", "stages", "spec.py") in path and not path.startswith(root), path
