"""The analysis chain: executor stage -> objective stage, one call a step, a stage served elsewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jacana.analysis.chain import analysis_chain, parse_remote
from jacana.analysis.optimize import OptimizeSettings, Optimizer
from jacana.facility.executor import Executor, InProcessExecutor
from jacana.protocol.pipeline import gradient_mode
from jacana.stages.analysis import default_params, default_relax
from jacana.stages.errors import ConfigError

TOKEN = "chain-test-token-0123456789"


@pytest.fixture(scope="module")
def executor(reference_sample):
    """The session's in-process executor (8k synthetic events; conftest.py): read and compiled once."""
    return reference_sample["ref"]


def test_executor_meets_the_protocol_and_declares_its_stage(executor):
    assert isinstance(executor, Executor)
    spec = executor.stage().describe()
    assert spec.param_names == ("lepton_pt_min", "jet_pt_min", "jet_eta_max", "btag_min")
    assert all(t.name.startswith("relax.") and not t.differentiable for t in spec.inputs)
    assert {t.name.split(".")[1] for t in spec.outputs} == set(executor.spec.samples)
    assert gradient_mode(4) == "jacobian" and gradient_mode(40) == "vjp"


@pytest.mark.slow  # (53 s; forward == reverse is also checked per chunk in tests/test_soft_gradients.py)
def test_forward_and_reverse_mode_give_the_same_gradient(executor):
    """The pipeline's forward mode (Jacobians composed) equals its reverse mode (VJPs pulled back)."""
    params, relax = default_params(executor.spec), default_relax(executor.spec)
    chain = analysis_chain(executor, "sigma_mu", params)
    assert chain.mode == "jacobian"
    from jacana.stages.soft_stage import params_inputs, relax_inputs

    p, i = params_inputs(params), relax_inputs(relax)
    fwd_out, fwd = chain.pipeline.value_and_grad(p, i, "objective")
    rev = chain.pipeline.vjp(p, i, {"objective": np.ones(())}, tuple(p))
    for name in p:
        assert float(fwd[name]) == pytest.approx(float(rev[name]), rel=1e-9, abs=1e-15)
    value, grad = chain.value_and_grad(params, relax)
    assert value == pytest.approx(float(fwd_out["objective"]), rel=1e-12)
    assert set(grad) == set(params) and all(np.isfinite(float(g)) for g in grad.values())


def test_remote_stage_is_checked_before_any_data():
    assert parse_remote(["objective=127.0.0.1:8786"]) == {"objective": "127.0.0.1:8786"}
    for bad in (["objective"], ["yields=127.0.0.1:1"], ["objective=host:port"], ["objective=h:70000"]):
        with pytest.raises(ConfigError, match="--remote-stage"):
            parse_remote(bad)


@pytest.fixture(scope="module")
def served_objective(tmp_path_factory):
    """``jacana serve-stage`` of the objective stage in another process; yields its address."""
    token_file = tmp_path_factory.mktemp("token") / "token.txt"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jacana.protocol.cli", "--stage", "jacana.stages.stats.stage:objective_stage",
         "--stage-arg", "objective=sigma_mu", "--token-file", str(token_file), "--idle-exit", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = proc.stdout.readline()
        m = re.search(r"serving 'jacana.objective' on ([\d.]+):(\d+)", line)
        assert m, f"no address in {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        yield f"{m.group(1)}:{m.group(2)}", str(token_file)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_two_steps_with_a_remote_objective_equal_the_in_process_run(executor, served_objective, tmp_path):
    """The objective stage served by another process sits in the optimised chain: two steps give the
    parameters of the all-in-process run (1e-9 relative)."""
    address, token_file = served_objective
    settings = OptimizeSettings(steps=2, hard_every=0, keep_best=False)
    start = executor.spec.param_values()
    local = Optimizer(executor.spec, executor, settings, tmp_path / "local", progress=False).run(start)
    remote_opt = Optimizer(executor.spec, executor, settings, tmp_path / "remote", progress=False,
                           remote={"objective": address}, token_file=token_file)
    remote = remote_opt.run(start)
    assert type(remote_opt.chain.objective).__name__ == "RemoteStage"
    for name, value in local["params"].items():
        assert remote["params"][name] == pytest.approx(value, rel=1e-9), name
    assert [h["loss"] for h in remote["history"]] == pytest.approx([h["loss"] for h in local["history"]], rel=1e-9)
    assert local["params"] != start  # the steps moved the cuts


def test_a_served_stage_of_another_signature_is_refused(executor, served_objective):
    from jacana.analysis.chain import connect_remote
    from jacana.stages.stats.stage import ObjectiveStage

    address, token_file = served_objective
    other = ObjectiveStage(executor.spec.with_overrides(["regions.4j1b.edges={low: 110, high: 550, bins: 4}"]))
    with pytest.raises(ConfigError, match="does not match"):
        connect_remote(address, other, token_file=token_file)


class ScaledYields:
    """A user's own additive stage on jacana's batches: the soft yields times a parameter ``k``."""

    def __new__(cls, config, keys, params_like, batches=None, **options):
        from jacana.stages.soft_stage import SoftYieldsStage

        class Scaled(SoftYieldsStage):
            def apply(self, params, inputs):  # in forward mode apply runs jacobian (already scaled)
                outs = super().apply(params, inputs)
                through_jacobian = self.mode == "jacobian" and self.apply_program == "auto"
                return outs if through_jacobian else {k: 2.0 * v for k, v in outs.items()}

            def jacobian(self, params, inputs, wrt=None):
                outs, jac = super().jacobian(params, inputs, wrt)
                return {k: 2.0 * v for k, v in outs.items()}, {k: 2.0 * v for k, v in jac.items()}

        return Scaled(config, keys, params_like, batches, **options)


def test_an_executor_runs_any_additive_stage_on_its_batches(executor):
    params, relax = default_params(executor.spec), default_relax(executor.spec)
    other = InProcessExecutor.__new__(InProcessExecutor)
    other.__dict__.update(executor.__dict__, stage_factory=ScaledYields, _stages={})
    base, scaled = executor.yields(params, relax), other.yields(params, relax)
    (yb, jb), (ys, js) = executor.yields_and_jacobian(params, relax), other.yields_and_jacobian(params, relax)
    for key, by_region in base.items():
        for region, by_kind in by_region.items():
            assert np.array_equal(scaled[key][region]["sumw"], 2.0 * by_kind["sumw"])
            assert np.array_equal(ys[key][region]["sumw"], 2.0 * yb[key][region]["sumw"])
            assert np.array_equal(js[key][region]["sumw"]["jet_pt_min"], 2.0 * jb[key][region]["sumw"]["jet_pt_min"])


def test_the_likelihood_can_run_on_a_chosen_device(executor):
    """ObjectiveStage(device=...) commits the yields to that device, so its jitted likelihood runs there
    (the CPU, when the events are on an accelerator: facility.devices.likelihood_device), with the
    same value and gradient as on JAX's default device."""
    import jax

    from jacana.stages.soft_stage import params_inputs, relax_inputs
    from jacana.stages.stats.stage import ObjectiveStage

    params, relax = default_params(executor.spec), default_relax(executor.spec)
    yields = executor.stage().apply(params_inputs(params), relax_inputs(relax))
    cpu = jax.local_devices(backend="cpu")[0]
    default, placed = ObjectiveStage(executor.spec), ObjectiveStage(executor.spec, device=cpu)
    (v0, g0), (v1, g1) = default.jacobian({}, yields), placed.jacobian({}, yields)
    assert float(v1["objective"]) == float(v0["objective"]) > 0
    np.testing.assert_array_equal(g1["objective"], g0["objective"])
    flat = placed._yields(yields)
    assert {d for leaf in jax.tree.leaves(flat) for d in leaf.devices()} == {cpu}
