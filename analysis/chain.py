"""The optimised chain: protocol stages from the events to the objective.

::

    params (cuts, edges, nn.*) ─┐
    relax.* ────────────────────┴─> [soft yields]  ── yields.<sample>.<variation>.<region>.<sumw|sumw2> ──>
                                    an additive Stage, run by an executor over every chunk
                                    (in-process, dask, coffea)
                                 ─> [objective]    ── objective (a scalar to minimise)
                                    workspace -> pyhf likelihood -> expected sensitivity

:func:`analysis_chain` composes them in a :class:`~jacana.protocol.pipeline.Pipeline`; one
optimisation step is ``chain.value_and_grad(params, relax)``, forward or reverse mode chosen
by the pipeline. Any stage can be replaced by one served elsewhere (``jacana serve-stage``, or
a peer in another language) that declares the same signature: ``remote={"objective":
"HOST:PORT"}``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jacana.facility import devices
from jacana.facility.executor import Executor
from jacana.protocol.pipeline import Pipeline
from jacana.protocol.rpc import RemoteStage
from jacana.protocol.stage import Stage, StageSpec
from jacana.protocol.tree import unflatten
from jacana.stages.errors import ConfigError
from jacana.stages.soft_stage import params_inputs, relax_inputs
from jacana.stages.stats.stage import OUTPUT, ObjectiveStage

#: The stages of the chain that a remote stage may replace.
REPLACEABLE = ("objective",)


def parse_remote(entries) -> dict[str, str]:
    """``["objective=HOST:PORT", ...]`` (the CLI's ``--remote-stage``) as ``{stage: "HOST:PORT"}``."""
    out: dict[str, str] = {}
    for entry in entries or ():
        name, sep, address = str(entry).partition("=")
        if not sep or name not in REPLACEABLE or ":" not in address:
            raise ConfigError(f"--remote-stage {entry!r}: expected STAGE=HOST:PORT with STAGE one of {list(REPLACEABLE)}")
        host, _, port = address.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--remote-stage {entry!r}: {port!r} is not a port number")
        out[name] = address
    return out


def connect_remote(address: str, local: Stage, *, token: str | None = None, token_file: str | None = None,
                   timeout: float = 60.0) -> RemoteStage:
    """The stage served at ``address`` ("HOST:PORT"), checked to declare ``local``'s signature."""
    from jacana.protocol.server import TcpTransport

    host, _, port = address.rpartition(":")
    remote = RemoteStage(TcpTransport(host, int(port), token=token, token_file=token_file, timeout=timeout))
    _check_same_signature(remote.describe(), local.describe(), address)
    return remote


def _check_same_signature(got: StageSpec, want: StageSpec, where: str) -> None:
    def table(spec):
        return {t.name: (t.shape, t.dtype) for t in spec.params + spec.inputs + spec.outputs}

    g, w = table(got), table(want)
    missing, extra = sorted(set(w) - set(g)), sorted(set(g) - set(w))
    differ = sorted(n for n in set(g) & set(w) if g[n] != w[n])
    if missing or extra or differ:
        raise ConfigError(f"the stage served at {where} ({got.stage!r}) does not match the chain's {want.stage!r}:"
                          f" missing {missing[:3]}, unexpected {extra[:3]}, other shape or dtype {differ[:3]}")


class AnalysisChain:
    """``value_and_grad(params, relax)`` and ``loss(params, relax)`` of the analysis (module docstring).

    ``params`` are nested dicts as the optimiser holds them (cuts, ``edges_<region>``, ``nn``:
    {weight: array}); the chain flattens them into named tensors and back.
    """

    def __init__(self, executor: Executor, objective: Stage, params_like: Mapping):
        self.executor = executor
        self.objective = objective
        self.pipeline = Pipeline([executor.stage(params_like), objective], stage_id="jacana.analysis",
                                 outputs=(OUTPUT,))

    @property
    def mode(self) -> str:
        """``"jacobian"`` (one pass a step) or ``"vjp"`` (two passes a step)."""
        return self.pipeline.mode()

    def value_and_grad(self, params: Mapping, relax: Mapping) -> tuple[float, dict]:
        outs, grads = self.pipeline.value_and_grad(params_inputs(params), relax_inputs(relax), OUTPUT)
        return float(np.asarray(outs[OUTPUT])), unflatten(grads)

    def loss(self, params: Mapping, relax: Mapping) -> float:
        return float(np.asarray(self.pipeline.apply(params_inputs(params), relax_inputs(relax))[OUTPUT]))

    @property
    def soft_model(self) -> dict | None:
        """The objective's fixed model structure, once built: ``{"pruned": [{"region", "sample",
        "modifier", "type"}], "decided_from"}`` (the template hygiene's pruning); None for a remote
        objective stage or before the first pass."""
        sensitivity = getattr(self.objective, "sensitivity", None)
        if sensitivity is None:
            return None
        pruned = [dict(zip(("region", "sample", "modifier", "type"), key)) for key in sorted(sensitivity.pruned)]
        return {"pruned": pruned,
                "decided_from": "the soft yields of the training events at the first pass (widest relaxation)"}

    def template(self, params: Mapping, relax: Mapping) -> None:
        """Fix the objective's model structure from the yields at ``params`` (no gradient)."""
        stage = self.pipeline.stages[0]
        self.objective.apply({}, stage.apply(params_inputs(params), relax_inputs(relax)))


def analysis_chain(executor: Executor, objective: str, params_like: Mapping, *, remote: Mapping[str, str] | None = None,
                   token: str | None = None, token_file: str | None = None,
                   likelihood_device: str = "auto") -> AnalysisChain:
    """The chain of ``executor``'s analysis for ``objective``; ``remote`` replaces stages by served ones.
    ``likelihood_device``: where the objective runs ("auto": the CPU when the events are on an
    accelerator; :func:`jacana.facility.devices.likelihood_device`)."""
    local = ObjectiveStage(executor.spec, objective, device=devices.likelihood_device(likelihood_device))
    stage: Stage = local
    if remote and "objective" in remote:
        stage = connect_remote(remote["objective"], local, token=token, token_file=token_file)
    return AnalysisChain(executor, stage, params_like)
