"""The dask worker plugin: jacana's JAX settings on every worker, and a version check.

:class:`JacanaWorkerPlugin` runs on each worker when it starts (and on every worker that joins
later, e.g. one restarted after a crash):

* it applies the facility profile's environment (``device``: ``JAX_PLATFORMS``; ``threads``:
  XLA/BLAS thread counts) *before* JAX initialises a backend on that worker;
* it raises glibc's mmap threshold to 32 MiB (:func:`raise_mmap_threshold`; see there why);
* it calls :func:`jacana.facility.jaxsetup.configure_jax` (64-bit floats, no GPU memory
  preallocation, the persistent compilation cache under ``$JACANA_CACHE``);
* it checks that the worker runs the driver's versions of jacana, jax, jaxlib and numpy (a
  worker with another version would compile other programs and could give other numbers) and,
  for ``device: gpu``, that JAX on the worker sees a GPU.

A failed check raises :class:`~jacana.facility.profiles.FacilityError` on the driver when the
plugin is registered (``client.register_plugin``), naming the worker and what differs.
"""

from __future__ import annotations

import os
import platform
from typing import Mapping

from distributed.diagnostics.plugin import WorkerPlugin

#: Packages whose versions must match between the driver and the workers.
CHECKED_PACKAGES = ("jacana", "jax", "jaxlib", "numpy")
DEVICES = ("cpu", "gpu")


def local_versions() -> dict[str, str]:
    """Versions of :data:`CHECKED_PACKAGES` (and the Python minor version) in this process."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": ".".join(platform.python_version_tuple()[:2])}
    for name in CHECKED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def thread_env(threads: int) -> dict[str, str]:
    """Environment that limits XLA's CPU backend and BLAS to ``threads`` threads."""
    n = str(int(threads))
    env = {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    if int(threads) == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            env["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    return env


#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger values are refused
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def raise_mmap_threshold(nbytes: int = MMAP_THRESHOLD_MAX) -> bool:
    """Serve allocations below ``nbytes`` from the heap rather than fresh mmaps (glibc only).

    dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting any of
    these parameters also stops glibc's dynamic mmap threshold, which then stays at
    128 KiB: every column array above that size is a new mmap, zero-filled page by page
    on first touch and unmapped when freed, which makes a worker's reads markedly
    slower than a plain process's (measured: ``docs/facility.md``, "The worker plugin").
    The trim threshold is kept, so freed memory at the top of the heap still goes back
    to the system. Returns whether glibc accepted it.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))


class JacanaWorkerPlugin(WorkerPlugin):
    """Configure JAX on a dask worker and check its versions against the driver's.

    ``versions``: the driver's (default: this process's :func:`local_versions`); ``device``:
    ``"cpu"`` or ``"gpu"``; ``threads``: limit XLA/BLAS threads per worker process (``None``
    keeps the worker's environment); ``env``: extra environment variables (never credentials).
    """

    name = "jacana"
    idempotent = False

    def __init__(self, versions: Mapping[str, str] | None = None, device: str = "cpu",
                 threads: int | None = None, env: Mapping[str, str] | None = None,
                 compilation_cache: bool = True):
        if device not in DEVICES:
            from jacana.facility.errors import FacilityError

            raise FacilityError(f"device must be one of {DEVICES}, got {device!r}")
        self.versions = dict(versions) if versions is not None else local_versions()
        self.device = device
        self.threads = threads
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.compilation_cache = compilation_cache

    def environment(self) -> dict[str, str]:
        """The environment variables the plugin sets on a worker (before JAX starts there)."""
        env = dict(self.env)
        if self.threads is not None:
            env.update(thread_env(self.threads))
        if self.device == "cpu":
            env.setdefault("JAX_PLATFORMS", "cpu")
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        return env

    def setup(self, worker=None):
        from jacana.facility.jaxsetup import configure_jax
        from jacana.facility.errors import FacilityError

        where = getattr(worker, "address", "this worker")
        for k, v in self.environment().items():
            if k == "JAX_PLATFORMS" and os.environ.get(k):
                continue  # the site's own choice wins (e.g. "cuda,cpu")
            os.environ[k] = v
        theirs = local_versions()
        differ = {k: (v, theirs.get(k)) for k, v in self.versions.items() if theirs.get(k) != v}
        if differ:
            what = ", ".join(f"{k} {mine} on the driver vs {other} on the worker" for k, (mine, other) in differ.items())
            raise FacilityError(f"worker {where} runs other versions than the driver: {what}; install the same"
                                " environment on the workers (or use the facility's matching image)")
        raise_mmap_threshold()
        configure_jax(self.compilation_cache)
        import jax

        import jacana.facility.worker_tasks  # noqa: F401  (import the worker side once, at worker start)
        import jacana.stages.columns  # noqa: F401  (uproot, awkward: else the first read pays for them)
        import jacana.stages.jacobian  # noqa: F401

        platforms = {d.platform for d in jax.devices()}
        if self.device == "gpu" and not platforms & {"gpu", "cuda", "rocm"}:
            raise FacilityError(f"worker {where}: the profile asks for device: gpu but JAX sees only {sorted(platforms)}"
                                " (install jax[cuda12] on the workers, or set device: cpu)")
        return None
