"""Facility profiles: where the dask workers come from, as one option (``--profile NAME``).

A profile is a small YAML file (``facility/profiles/<name>.yaml``, or any path) with a ``kind``:

``local``
    a :class:`distributed.LocalCluster` of ``workers`` processes on this machine.
``scheduler``
    an existing dask scheduler (coffea-casa runs one in the user's pod); the address comes
    from the profile's ``address``, or from the environment variable named by ``address_env``.
``gateway``
    a dask-gateway server (Fermilab EAF, Purdue AF): a new cluster with ``workers`` workers,
    or an existing one by ``cluster_name``. Needs ``dask-gateway`` (imported only here).
``htcondor``
    HTCondor jobs through dask-jobqueue (``HTCondorCluster``), optionally with GPUs
    (``job_extra_directives: {request_GPUs: 1}``, ``worker_extra_args: [--resources, GPU=1]``).

A ``local`` profile serves dask's dashboard on a free port (``dashboard: true``, the default), on
an address (``dashboard: ":8787"``) or not at all (``dashboard: false``; the environment variable
``JACANA_DASHBOARD=0`` turns it off where a profile does not say, e.g. in tests). A facility's
cluster serves its own. :func:`announce_dashboard` prints the link once.

Every profile also says ``device`` (``cpu`` or ``gpu``: what JAX uses on the workers) and
``worker`` settings for :class:`~jacana.facility.plugin.JacanaWorkerPlugin` (``threads``, ``env``).
Credentials never appear in a profile and jacana never writes any: a key that looks like one
(``token``, ``password``, ``secret``, ...) is refused; dask-gateway and dask's TLS settings take
them from the environment or the site's own configuration files.

>>> p = load_profile("local")
>>> p["kind"], p["device"]
('local', 'cpu')
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from jacana.facility.errors import FacilityError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
KINDS = ("local", "scheduler", "gateway", "htcondor")
DEVICES = ("cpu", "gpu")
_SECRET = re.compile(r"(token|password|passwd|secret|credential|api[_-]?key|private[_-]?key)", re.I)


# -- schema ---------------------------------------------------------------------------------
_COMMON = {"name": str, "kind": str, "description": str, "device": str, "workers": int,
           "connect_timeout": (int, float), "worker": dict, "task_resources": dict}
_BY_KIND: dict[str, dict[str, Any]] = {
    "local": {"threads_per_worker": int, "memory_limit": (str, int), "processes": bool, "dashboard": (bool, str)},
    "scheduler": {"address": str, "address_env": str},
    "gateway": {"address": str, "address_env": str, "proxy_address": str, "auth": str,
                "cluster_name": str, "cluster_options": dict, "adapt": dict, "shutdown_on_close": bool},
    "htcondor": {"cores": int, "processes": int, "memory": str, "disk": str, "gpus": int,
                 "job_extra_directives": dict, "worker_extra_args": list, "job_script_prologue": list,
                 "log_directory": str, "python": str, "scheduler_options": dict},
}
_WORKER_KEYS = {"threads": (int, type(None)), "env": dict, "compilation_cache": bool}


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _find_secrets(obj: Any, where: str = "") -> list[str]:
    found = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            path = f"{where}.{k}" if where else str(k)
            if _SECRET.search(str(k)) and not str(k).endswith("_env"):
                found.append(path)
            found += _find_secrets(v, path)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _find_secrets(v, f"{where}[{i}]")
    return found


def validate_profile(raw: Any, source: str = "<dict>") -> dict:
    """Check a profile mapping against the schema above; returns it with defaults filled in."""
    if not isinstance(raw, Mapping):
        raise FacilityError(f"profile {source}: must be a mapping, got {type(raw).__name__}")
    prof = copy.deepcopy(dict(raw))
    kind = prof.get("kind")
    if kind not in KINDS:
        raise FacilityError(f"profile {source}: kind must be one of {KINDS}, got {kind!r}")
    secrets = _find_secrets(prof)
    if secrets:
        raise FacilityError(f"profile {source}: {', '.join(secrets)} look like credentials; profiles never hold"
                            " credentials: give them through the environment (e.g. JUPYTERHUB_API_TOKEN, a"
                            " Kerberos ticket, dask's TLS configuration)")
    allowed = {**_COMMON, **_BY_KIND[kind]}
    for key, value in prof.items():
        if key not in allowed:
            raise FacilityError(f"profile {source}: unknown key {key!r} for kind {kind!r}; allowed: {sorted(allowed)}")
        if not isinstance(value, allowed[key]) or (allowed[key] is int and isinstance(value, bool)):
            raise FacilityError(f"profile {source}: {key} must be {_type_name(allowed[key])}, got {value!r}")
    prof.setdefault("name", Path(source).stem if source != "<dict>" else kind)
    prof.setdefault("device", "cpu")
    if prof["device"] not in DEVICES:
        raise FacilityError(f"profile {source}: device must be one of {DEVICES}, got {prof['device']!r}")
    if "workers" in prof and prof["workers"] < 1:
        raise FacilityError(f"profile {source}: workers must be >= 1, got {prof['workers']}")
    prof.setdefault("connect_timeout", 30)
    worker = prof.setdefault("worker", {})
    for key, value in worker.items():
        if key not in _WORKER_KEYS:
            raise FacilityError(f"profile {source}: unknown key worker.{key}; allowed: {sorted(_WORKER_KEYS)}")
        if not isinstance(value, _WORKER_KEYS[key]):
            raise FacilityError(f"profile {source}: worker.{key} must be {_type_name(_WORKER_KEYS[key])}, got {value!r}")
    if kind == "scheduler" and not (prof.get("address") or prof.get("address_env")):
        raise FacilityError(f"profile {source}: a scheduler profile needs address or address_env")
    return prof


def available_profiles() -> list[str]:
    """Names of the profiles shipped with jacana."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(profile: str | Path | Mapping, **overrides: Any) -> dict:
    """A profile by name (shipped), path (YAML file) or mapping, validated, with ``overrides`` applied.

    ``None`` values in ``overrides`` are ignored, so CLI options pass straight through.
    """
    if isinstance(profile, Mapping):
        raw, source = dict(profile), "<dict>"
    else:
        text = str(profile)
        path = Path(text)
        if not path.suffix and (PROFILE_DIR / f"{text}.yaml").is_file():
            path = PROFILE_DIR / f"{text}.yaml"
        if not path.is_file():
            raise FacilityError(f"no facility profile {text!r}: give one of {available_profiles()} or a YAML file path")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise FacilityError(f"profile {path}: not valid YAML: {exc}") from None
        source = str(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return validate_profile(raw, source)


# -- connecting -----------------------------------------------------------------------------
def _optional(module: str, package: str, kind: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FacilityError(f"the {kind!r} profile needs the {package!r} package, which is not installed:"
                            f" pip install {package}") from None


def connect_scheduler(address: str, timeout: float = 10.0):
    """A :class:`distributed.Client` of the scheduler at ``address``; a clear error within ``timeout`` s."""
    from distributed import Client

    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise FacilityError(f"cannot reach the dask scheduler at {address} within {timeout:g} s"
                            f" ({type(exc).__name__}: {exc}); check the address (and that the scheduler runs)") from None
    except ValueError as exc:
        raise FacilityError(f"invalid dask scheduler address {address!r}: {exc}") from None


def _resolve_address(prof: Mapping) -> str:
    if prof.get("address"):
        return prof["address"]
    env = prof["address_env"]
    addr = os.environ.get(env)
    if not addr:
        raise FacilityError(f"profile {prof['name']!r}: the scheduler address is taken from ${env}, which is not set")
    return addr


#: Values of ``$JACANA_DASHBOARD`` that turn a local cluster's dashboard off.
DASHBOARD_OFF = ("0", "off", "false", "no")
_ANNOUNCED: set[str] = set()


def dashboard_address(prof: Mapping) -> str | None:
    """The address a local cluster serves its dashboard on (None: no dashboard): the profile's
    ``dashboard`` (true: a free port, so two runs never collide; false: none; a string: that
    address), else on unless ``$JACANA_DASHBOARD`` is one of :data:`DASHBOARD_OFF`."""
    want = prof.get("dashboard")
    if want is None:
        env = os.environ.get("JACANA_DASHBOARD", "").strip()
        want = False if env.lower() in DASHBOARD_OFF else True if env.lower() in ("", "1", "on", "true", "yes") else env
    if want is False:
        return None
    return ":0" if want is True else str(want)


def announce_dashboard(client, file=None) -> str | None:
    """Print ``dask dashboard: LINK`` once per link and process (to ``file``, default stderr); returns
    the link (None when the client has none). The link points where the scheduler runs: on a remote
    cluster, open it through the facility's proxy or an SSH tunnel."""
    import sys

    link = getattr(client, "dashboard_link", None)
    if not link:
        return None
    if link not in _ANNOUNCED:
        _ANNOUNCED.add(link)
        print(f"dask dashboard: {link}", file=file or sys.stderr, flush=True)
    return link


def connect(profile: str | Path | Mapping, **overrides: Any):
    """``(client, cluster_or_None)`` for a profile; the caller closes both (cluster may be None).

    >>> client, cluster = connect("local", workers=1)  # doctest: +SKIP
    """
    prof = load_profile(profile, **overrides)
    kind, timeout = prof["kind"], float(prof["connect_timeout"])
    if kind == "local":
        import logging

        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=int(prof.get("workers", 2)), threads_per_worker=int(prof.get("threads_per_worker", 1)),
                               processes=bool(prof.get("processes", True)), memory_limit=prof.get("memory_limit", "auto"),
                               dashboard_address=dashboard_address(prof), silence_logs=logging.ERROR)
        return Client(cluster, set_as_default=False), cluster
    if kind == "scheduler":
        return connect_scheduler(_resolve_address(prof), timeout), None
    if kind == "gateway":
        gw_mod = _optional("dask_gateway", "dask-gateway", kind)
        kwargs = {}
        if prof.get("address") or prof.get("address_env"):
            kwargs["address"] = _resolve_address(prof)
        if prof.get("proxy_address"):
            kwargs["proxy_address"] = prof["proxy_address"]
        if prof.get("auth"):
            kwargs["auth"] = prof["auth"]  # e.g. "jupyterhub": the token comes from $JUPYTERHUB_API_TOKEN
        try:
            gateway = gw_mod.Gateway(**kwargs)
            if prof.get("cluster_name"):
                cluster = gateway.connect(prof["cluster_name"])
            else:
                cluster = gateway.new_cluster(**prof.get("cluster_options", {}))
                if prof.get("adapt"):
                    cluster.adapt(**prof["adapt"])
                else:
                    cluster.scale(int(prof.get("workers", 2)))
            client = cluster.get_client(set_as_default=False)
        except FacilityError:
            raise
        except Exception as exc:
            raise FacilityError(f"dask-gateway ({kwargs.get('address', 'address from the dask config')}):"
                                f" {type(exc).__name__}: {exc}") from exc
        return client, cluster
    if kind == "htcondor":
        jq = _optional("dask_jobqueue", "dask-jobqueue", kind)
        from distributed import Client

        opts = {k: prof[k] for k in ("cores", "processes", "memory", "disk", "job_extra_directives", "worker_extra_args",
                                     "job_script_prologue", "log_directory", "python", "scheduler_options") if k in prof}
        opts.setdefault("cores", 1)
        opts.setdefault("memory", "4GB")
        opts.setdefault("disk", "4GB")
        gpus = int(prof.get("gpus", 1 if prof["device"] == "gpu" else 0))
        if gpus:
            opts["job_extra_directives"] = {"request_GPUs": gpus, **opts.get("job_extra_directives", {})}
            extra = list(opts.get("worker_extra_args", []))
            if "--resources" not in extra:
                extra += ["--resources", f"GPU={gpus}"]
            opts["worker_extra_args"] = extra
        try:
            cluster = jq.HTCondorCluster(**opts)
            cluster.scale(jobs=int(prof.get("workers", 2)))
        except Exception as exc:
            raise FacilityError(f"HTCondor cluster (dask-jobqueue): {type(exc).__name__}: {exc}") from exc
        return Client(cluster, set_as_default=False), cluster
    raise FacilityError(f"unknown profile kind {kind!r}")  # validate_profile refuses it first


def plugin_for(prof: Mapping):
    """The :class:`~jacana.facility.plugin.JacanaWorkerPlugin` a profile asks for."""
    from jacana.facility.plugin import JacanaWorkerPlugin

    w = prof.get("worker", {})
    return JacanaWorkerPlugin(device=prof.get("device", "cpu"), threads=w.get("threads"), env=w.get("env"),
                              compilation_cache=w.get("compilation_cache", True))
