"""Benchmark of the dask executor against in-process, on one machine (ratios from one run).

    python -m jacana.bench.scaleout /tmp/gen1m/fileset.json --workers 2 --repeats 3

Reports, each measured in the same run:

* steady-state step time (forward-mode yields + Jacobians, after one warm-up step) in-process
  and with ``workers`` local dask workers, and the speed-up; and with one worker, for the
  scale-out speed-up of ``workers`` workers over one;
* per-task overhead: the round trip of a no-op task (submit -> result) on the same cluster, and
  the step's wall time minus its slowest shard's compute time;
* bytes per step received by the driver (all its TCP sockets, ``TCP_INFO``) vs the size of
  the one response message;
* the first (reading) pass: uproot read + densify + regroup on the workers, vs a plain uproot
  read of the same branches and entries in this process, on the same workers after the steps
  (warm), and as the first task of fresh workers of another cluster (cold, like the first pass).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import time
from pathlib import Path

_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received in Linux's struct tcp_info


def driver_bytes_received() -> int | None:
    """Bytes received so far on every TCP socket of this process (Linux), or None."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir() or not hasattr(socket, "TCP_INFO"):
        return None
    total = 0
    for fd in os.listdir(fd_dir):
        try:
            if not os.readlink(fd_dir / fd).startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                if len(info) >= _TCPI_BYTES_RECEIVED + 8:
                    total += struct.unpack_from("<Q", info, _TCPI_BYTES_RECEIVED)[0]
        except OSError:
            pass
        finally:
            s.close()
    return total


def plain_read_task(path: str, tree: str, branches: list, start: int, stop: int) -> int:
    """A plain uproot read of ``branches`` for entries [start, stop) (the baseline of the first pass)."""
    import uproot

    with uproot.open(path) as f:
        arrays = f[tree].arrays(branches, entry_start=start, entry_stop=stop, library="ak", how=dict)
    return sum(int(a.layout.nbytes) for a in arrays.values())


def _plain_read_on_workers(client, spec, chunks, branches) -> float:
    """Seconds for the cluster's workers to read every chunk with :func:`plain_read_task`."""
    t0 = time.perf_counter()
    client.gather([client.submit(plain_read_task, c.path, spec.tree, branches, c.entry_start, c.entry_stop,
                                 pure=False) for c in chunks])
    return time.perf_counter() - t0


#: Runs ``python -m ...`` confined to one core: ``python -c _PINNED CORE -m module args...`` (no fork
#: of this multithreaded process with a ``preexec_fn``: the affinity is set in the new interpreter).
_PINNED = ("import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])});"
           " os.execv(sys.executable, [sys.executable] + sys.argv[2:])")


def _start_cluster(workers: int, timeout: float = 60.0):
    """A dask scheduler and ``workers`` single-threaded worker processes as subprocesses (so the
    driver's sockets carry only the driver's traffic); returns (client, processes).

    Each worker is pinned to its own core (round robin) where the OS allows it: XLA would
    otherwise spread every worker's step over all cores, so one worker would already use the
    whole machine and adding workers could show no scale-out at all."""
    import subprocess
    import sys
    import tempfile

    from distributed import Client

    d = tempfile.mkdtemp(prefix="jacana-bench-")
    sched_file = os.path.join(d, "scheduler.json")
    procs = _Processes([subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file",
                                          sched_file, "--port", "0", "--no-dashboard"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)])
    procs.folder = d
    try:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        for i in range(workers):
            pin = [sys.executable, "-c", _PINNED, str(cores[i % len(cores)])] if cores else [sys.executable]
            procs.append(subprocess.Popen(pin + ["-m", "distributed.cli.dask_worker", "--scheduler-file", sched_file,
                                                 "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        t0 = time.time()
        while not os.path.exists(sched_file):
            if time.time() - t0 > timeout:
                raise RuntimeError("the benchmark's dask scheduler did not start")
            time.sleep(0.1)
        client = Client(scheduler_file=sched_file, timeout=timeout, set_as_default=False)
        client.wait_for_workers(workers, timeout=timeout)
    except BaseException:  # no process or folder outlives a cluster that did not come up
        _stop(procs)
        raise
    return client, procs


class _Processes(list):
    """The processes of one benchmark cluster, and the folder of its scheduler file."""

    folder: str | None = None


def _stop(procs) -> None:
    """Stop the processes this benchmark started (by their id), wait for them, remove their folder."""
    import shutil

    try:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    finally:
        if getattr(procs, "folder", None):
            shutil.rmtree(procs.folder, ignore_errors=True)


def bench_dask(fileset: str | Path, workers: int = 2, repeats: int = 3, chunk_size: int = 100_000,
               in_process: bool = True, separate_scheduler: bool = True, scheduler: str | None = None,
               scaling: bool = True) -> dict:
    """Figures of the dask executor vs in-process (see the module docstring); returns a dict.

    With ``scheduler`` (an address), the workers of that existing cluster are used (they must
    see the fileset's files); ``workers`` is then ignored and ``out["workers"]`` counts them.
    ``scaling`` (local clusters of ``workers`` > 1): also the step on a one-worker cluster, and
    ``speedup_over_one_worker``.
    """
    from jacana.facility.jaxsetup import configure_jax

    configure_jax()
    from jacana.facility.dask_executor import DaskExecutor, noop_task
    from jacana.facility.executor import InProcessExecutor
    from jacana.facility.hardrun import analysis_chunks
    from jacana.stages.analysis import default_params, default_relax
    from jacana.stages.fileset import load_fileset
    from jacana.stages.spec import load_spec

    spec = load_spec()
    chunks = analysis_chunks(spec, load_fileset(fileset), chunk_size)
    params, relax = default_params(spec), default_relax(spec)
    branches = spec.needed_branches()
    out: dict = {"events": sum(c.n_events for c in chunks), "chunks": len(chunks), "workers": workers,
                 "cpus": os.cpu_count()}

    t = time.perf_counter()
    for c in chunks:
        plain_read_task(c.path, spec.tree, branches, c.entry_start, c.entry_stop)
    out["plain_uproot_read_s"] = time.perf_counter() - t

    def steps(ex) -> tuple[float, list]:
        t0 = time.perf_counter()
        ex.yields_and_jacobian(params, relax)  # warm-up: compiles (or loads) every call shape
        warm = time.perf_counter() - t0
        times, cpu = [], []
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            ex.yields_and_jacobian(params, relax)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return warm, times, cpu

    if in_process:
        t = time.perf_counter()
        ex = InProcessExecutor(spec, chunks)
        out["in_process_read_s"] = time.perf_counter() - t
        out["in_process_warmup_s"], times, cpu = steps(ex)
        out["in_process_step_s"] = statistics.median(times)
        out["in_process_step_cpu_s"] = statistics.median(cpu)
        out["in_process_steps_s"] = times
        ex.close()

    if scaling and scheduler is None and workers > 1:
        # scale-out: the same cluster with one worker. In-process JAX already spreads a step over the
        # cores (XLA's own threads), so "N workers vs in-process" on one machine is about 1 by design;
        # N workers vs one worker, each single-threaded, is what adding workers buys.
        client1, procs1 = _start_cluster(1)
        try:
            dx1 = DaskExecutor(spec, chunks, client=client1)
            try:
                out["one_worker_warmup_s"], times, _ = steps(dx1)
                out["one_worker_step_s"] = statistics.median(times)
            finally:
                dx1.close()
        finally:
            client1.close()
            _stop(procs1)

    t = time.perf_counter()
    procs, client = [], None
    if scheduler is not None:  # an existing cluster: its workers, left running
        from jacana.facility.profiles import connect_scheduler

        client = connect_scheduler(scheduler)
        info = client.scheduler_info(n_workers=-1)["workers"]
        out["workers"] = len(info)
        out["worker_threads"] = sum(int(w.get("nthreads", 1)) for w in info.values())
        dx = DaskExecutor(spec, chunks, client=client)
    elif separate_scheduler:  # scheduler and workers in their own processes, as on a facility
        client, procs = _start_cluster(workers)
        dx = DaskExecutor(spec, chunks, client=client)
    else:
        dx = DaskExecutor(spec, chunks, workers=workers)
    try:
        out["dask_read_s"] = time.perf_counter() - t  # includes starting the cluster
        out["dask_read_pass_s"] = dx.read_seconds  # loads + plan + shards, cluster already up
        out["dask_batch_bytes"] = dx.loaded_bytes
        out["shard_cost_estimate"] = dx.shard_costs
        out["dask_warmup_s"], times, _ = steps(dx)
        out["dask_step_s"] = statistics.median(times)
        out["dask_steps_s"] = times
        out["last_step"] = dict(dx.last_step)
        b0 = driver_bytes_received()
        dx.yields_and_jacobian(params, relax)
        b1 = driver_bytes_received()
        out["driver_bytes_per_step"] = None if b0 is None else b1 - b0
        out["message_bytes"] = dx.last_step["bytes_to_driver"]
        client = dx.client
        rt = []
        for i in range(50):
            t0 = time.perf_counter()
            client.submit(noop_task, i, pure=False).result()
            rt.append(time.perf_counter() - t0)
        out["noop_task_round_trip_s"] = statistics.median(rt)
        out["step_overhead_s"] = out["last_step"]["seconds"] - max(out["last_step"]["shard_wall"])
        out["plain_uproot_read_on_workers_s"] = _plain_read_on_workers(client, spec, chunks, branches)
    finally:
        dx.close()
        if client is not None:
            client.close()
        _stop(procs)
    if scheduler is None and separate_scheduler:
        # the same plain read as the first thing fresh workers do (after jacana's worker plugin, as
        # the executor's first pass): both then pay the workers' first contact with the files
        client, procs = _start_cluster(workers)
        try:
            from jacana.facility.plugin import JacanaWorkerPlugin

            client.register_plugin(JacanaWorkerPlugin(), name="jacana")
            out["plain_uproot_read_on_fresh_workers_s"] = _plain_read_on_workers(client, spec, chunks, branches)
        finally:
            client.close()
            _stop(procs)
        out["first_pass_over_plain_read_on_fresh_workers"] = (out["dask_read_pass_s"]
                                                              / out["plain_uproot_read_on_fresh_workers_s"])
    if in_process:
        out["speedup_step"] = out["in_process_step_s"] / out["dask_step_s"]
    if "one_worker_step_s" in out:
        out["speedup_over_one_worker"] = out["one_worker_step_s"] / out["dask_step_s"]
    out["first_pass_over_plain_read"] = out["dask_read_pass_s"] / out["plain_uproot_read_s"]
    out["first_pass_over_plain_read_on_workers"] = out["dask_read_pass_s"] / out["plain_uproot_read_on_workers_s"]
    if out["driver_bytes_per_step"] is not None:
        out["driver_bytes_over_message"] = out["driver_bytes_per_step"] / out["message_bytes"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fileset")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=100_000)
    ap.add_argument("--no-in-process", action="store_true")
    ap.add_argument("--local-cluster", action="store_true", help="scheduler in this process (LocalCluster)")
    ap.add_argument("--scheduler", help="use the workers of this existing dask scheduler")
    a = ap.parse_args(argv)
    print(json.dumps(bench_dask(a.fileset, a.workers, a.repeats, a.chunk_size, not a.no_in_process,
                                not a.local_cluster, a.scheduler), indent=1))


if __name__ == "__main__":
    main()
