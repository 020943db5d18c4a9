"""Stage contract and composition: Jacobian and VJP modes equal jax.grad of one function."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jacana.protocol import errors
from jacana.protocol.message import Message
from jacana.protocol.pipeline import AdditiveStage, Part, Pipeline, as_jax_function, reduce_partials
from jacana.protocol.provenance import Provenance
from jacana.protocol.rpc import RemoteStage
from jacana.protocol.stage import JaxStage, Stage, StageSpec, TensorSpec
from jacana.protocol.transport import DaskTransport, InProcessTransport

N_EVENTS, N_BINS = 64, 5
EDGES = np.linspace(0.0, 1.0, N_BINS + 1).astype(np.float32)


def _events(seed=0, n=N_EVENTS):
    rng = np.random.default_rng(seed)
    return {"feat": rng.uniform(0, 1, size=(n, 2)).astype(np.float32),
            "weight": rng.uniform(0.5, 1.5, size=n).astype(np.float32),
            "is_signal": (rng.uniform(size=n) < 0.4).astype(np.int32)}


PARAMS = {"cut": np.float32(0.3), "slope": np.array([0.7, -0.2], np.float32)}


def yields_fn(p, i):
    """Soft selection (sigmoid cut on a linear observable) + soft histogram, per sample."""
    obs = jax.nn.sigmoid(i["feat"] @ p["slope"] * 3.0)
    sel = jax.nn.sigmoid((i["feat"][:, 0] - p["cut"]) / 0.05) * i["weight"]
    cdf = jax.nn.sigmoid((obs[:, None] - EDGES[None, :]) / 0.05)
    hist = (cdf[:, :-1] - cdf[:, 1:]) * sel[:, None]
    sig = (i["is_signal"] == 1)[:, None]
    return {"yields": jnp.stack([jnp.where(sig, hist, 0).sum(0), jnp.where(sig, 0, hist).sum(0)])}


def objective_fn(p, i):
    s, b = i["yields"][0], i["yields"][1]
    return {"objective": -jnp.sum(s**2 / (b + 1.0)) * p["lumi"]}


@functools.lru_cache(maxsize=None)
def make_stages(n=N_EVENTS):
    """Cached so that jit compilations are shared between tests (stages are immutable)."""
    ev = _events(n=n)
    histo = JaxStage(yields_fn, PARAMS, ev, stage_id="histograms", axes={"yields": ("sample", "bin")})
    obj = JaxStage(objective_fn, {"lumi": np.float32(1.0)}, {"yields": np.zeros((2, N_BINS), np.float32)},
                   differentiable_inputs=["yields"], stage_id="objective")
    return histo, obj


ALL_PARAMS = {**PARAMS, "lumi": np.float32(1.3)}


def one_function(params, events):
    return objective_fn(params, yields_fn(params, events))["objective"]


def reference_grad(events=None):
    events = events or _events()
    return jax.grad(one_function)({k: jnp.asarray(v) for k, v in ALL_PARAMS.items()}, events)


def assert_grads_close(got, want, rtol=2e-4):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]).reshape(np.shape(want[k])), want[k], rtol=rtol, atol=1e-6, err_msg=k)


def test_describe_is_abstract_and_complete():
    histo, obj = make_stages()
    spec = histo.describe()
    assert spec.param_names == ("cut", "slope") and spec.input_names == ("feat", "weight", "is_signal")
    assert spec.outputs == (TensorSpec("yields", (2, N_BINS), "float32", ("sample", "bin")),)
    assert spec.diff_args == ("cut", "slope")
    assert obj.describe().diff_args == ("lumi", "yields")
    # abstract evaluation for other input shapes, nothing computed
    big = histo.describe({"feat": TensorSpec("feat", (10**7, 2), "float32"),
                          "weight": TensorSpec("weight", (10**7,), "float32"),
                          "is_signal": TensorSpec("is_signal", (10**7,), "int32")})
    assert big.inputs[0].shape == (10**7, 2) and big.outputs[0].shape == (2, N_BINS)
    assert StageSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("mode", ["jacobian", "vjp", "jvp"])
def test_pipeline_modes_equal_jax_grad_of_one_function(mode):
    histo, obj = make_stages()
    pipe = Pipeline([histo, obj])
    ev = _events()
    want = reference_grad(ev)
    if mode == "jacobian":
        outs, jac = pipe.jacobian(ALL_PARAMS, ev)
        flat = jac["objective"].reshape(-1)
        got = {"cut": flat[0], "slope": flat[1:3], "lumi": flat[3]}
    elif mode == "vjp":
        outs = pipe.apply(ALL_PARAMS, ev)
        got = pipe.vjp(ALL_PARAMS, ev, {"objective": np.float32(1.0)})
    else:
        got = {}
        for name, v in ALL_PARAMS.items():
            for k in range(np.size(v)):
                t = np.zeros(np.shape(v), np.float32)
                t.reshape(-1)[k] = 1
                outs, tout = pipe.jvp(ALL_PARAMS, ev, {name: t})
                got.setdefault(name, np.zeros(np.shape(v), np.float32)).reshape(-1)[k] = tout["objective"]
    np.testing.assert_allclose(outs["objective"], one_function(ALL_PARAMS, ev), rtol=1e-6)
    assert_grads_close(got, want)


@pytest.mark.parametrize("mode", ["jacobian", "vjp"])
def test_as_jax_function_value_and_grad_matches_one_function(mode):
    histo, obj = make_stages()
    ev = _events()
    f = as_jax_function(Pipeline([histo, obj]), mode=mode)
    loss = lambda p: f(p, ev)["objective"]  # noqa: E731
    value, grads = jax.value_and_grad(loss)(ALL_PARAMS)
    np.testing.assert_allclose(value, one_function(ALL_PARAMS, ev), rtol=1e-6)
    assert_grads_close(grads, reference_grad(ev))
    # also under jit
    value2, grads2 = jax.jit(jax.value_and_grad(loss))(ALL_PARAMS)
    assert_grads_close(grads2, grads)


def test_jacobian_mode_is_one_round_trip_per_step():
    histo, obj = make_stages()

    class Counting(InProcessTransport):
        calls = []

        def request(self, msg):
            self.calls.append(msg.kind)
            return super().request(msg)

    remote = RemoteStage(Counting(Pipeline([histo, obj])))
    f = as_jax_function(remote, mode="jacobian")
    Counting.calls.clear()
    jax.value_and_grad(lambda p: f(p, _events())["objective"])(ALL_PARAMS)
    assert Counting.calls == ["jacobian"]
    g = as_jax_function(remote, mode="vjp")
    Counting.calls.clear()
    jax.value_and_grad(lambda p: g(p, _events())["objective"])(ALL_PARAMS)
    assert Counting.calls == ["apply", "vjp"]


def test_jax_function_composes_with_jax_code_around_it():
    histo, obj = make_stages()
    ev = _events()
    f = as_jax_function(RemoteStage(InProcessTransport(histo)))

    def loss(p):
        y = f({"cut": p["cut"], "slope": p["slope"]}, ev)["yields"]
        return objective_fn({"lumi": p["lumi"]}, {"yields": y})["objective"]

    assert_grads_close(jax.grad(loss)(ALL_PARAMS), reference_grad(ev))


def chunk_parts(make_transport, n_chunks=4):
    ev = _events()
    size = N_EVENTS // n_chunks
    parts = []
    for c in range(n_chunks):
        sl = slice(c * size, (c + 1) * size)
        chunk = {k: v[sl] for k, v in ev.items()}
        parts.append(Part(make_transport(), chunk, (Provenance("ttbar.root", sl.start, sl.stop, size),)))
    return parts


@pytest.mark.parametrize("mode", ["jacobian", "vjp"])
def test_additive_reduction_over_chunks_equals_whole(mode):
    histo, obj = make_stages(n=N_EVENTS // 4)
    summed = AdditiveStage(chunk_parts(lambda: InProcessTransport(histo)))
    assert summed.describe().input_names == ()
    f = as_jax_function(Pipeline([summed, obj]), mode=mode)
    value, grads = jax.value_and_grad(lambda p: f(p, {})["objective"])(ALL_PARAMS)
    np.testing.assert_allclose(value, one_function(ALL_PARAMS, _events()), rtol=1e-5)
    assert_grads_close(grads, reference_grad())


def test_additive_reduction_detects_missing_and_duplicate_chunks():
    histo, _ = make_stages(n=N_EVENTS // 4)
    parts = chunk_parts(lambda: InProcessTransport(histo))
    missing = AdditiveStage(parts[:3], expected=[p.provenance[0] for p in parts])
    with pytest.raises(errors.ProvenanceError, match="missing chunks: ttbar.root\\[48:64\\]"):
        missing.apply(PARAMS, {})
    dup = AdditiveStage(parts + [parts[0]])
    with pytest.raises(errors.ProvenanceError, match="appears 2 times"):
        dup.jacobian(PARAMS, {})


def test_reduce_partials_refuses_stale_or_mismatched_partials():
    a = Message("apply", {"y": np.ones(2)}, role="response", step=1, params_digest="",
                provenance=(Provenance("f", 0, 1, 1),))
    b = Message("apply", {"y": np.ones(2)}, role="response", step=2, provenance=(Provenance("f", 1, 2, 1),))
    with pytest.raises(errors.MalformedMessage, match="disagree"):
        reduce_partials([a, b])
    c = Message("apply", {"y": np.ones(3)}, role="response", step=1, provenance=(Provenance("f", 1, 2, 1),))
    with pytest.raises(errors.MalformedMessage, match="shapes"):
        reduce_partials([a, c])
    err = Message("error", role="response", meta={"error": {"code": "stage", "message": "boom"}})
    with pytest.raises(errors.StageError, match="boom"):
        reduce_partials([a, err])
    ok = reduce_partials([a, Message("apply", {"y": 2 * np.ones(2)}, role="response", step=1,
                                     provenance=(Provenance("f", 1, 2, 1),))])
    np.testing.assert_array_equal(ok.tensors["y"], [3, 3])
    assert len(ok.provenance) == 2


class VjpOnly(Stage):
    """A hand-written numpy stage implementing only vjp: y = a * x**2."""

    stage_id = "vjp-only"

    def describe(self, inputs=None):
        return StageSpec("vjp-only", (TensorSpec("a", (), "float64"),),
                         (TensorSpec("x", (3,), "float64", differentiable=True),), (TensorSpec("y", (3,), "float64"),))

    def apply(self, params, inputs):
        return {"y": params["a"] * inputs["x"] ** 2}

    def vjp(self, params, inputs, cotangents, wrt=None):
        ct, x = cotangents["y"], inputs["x"]
        grads = {"a": np.sum(ct * x**2), "x": ct * 2 * params["a"] * x}
        return {k: grads[k] for k in (wrt or ("a", "x"))}


class JvpOnly(VjpOnly):
    stage_id = "jvp-only"
    vjp = Stage.vjp

    def jvp(self, params, inputs, tangents):
        x = inputs["x"]
        t = tangents.get("a", 0) * x**2 + 2 * params["a"] * x * tangents.get("x", np.zeros(3))
        return self.apply(params, inputs), {"y": t}


@pytest.mark.parametrize("cls", [VjpOnly, JvpOnly])
def test_missing_derivatives_are_derived(cls):
    stage = cls()
    p, i = {"a": np.float64(2.0)}, {"x": np.array([1.0, 2.0, 3.0])}
    want_jac = np.concatenate([(i["x"] ** 2)[:, None], np.diag(4.0 * i["x"])], axis=1)
    outs, jac = stage.jacobian(p, i)
    np.testing.assert_allclose(jac["y"], want_jac)
    _, t = stage.jvp(p, i, {"x": np.ones(3)})
    np.testing.assert_allclose(t["y"], 4.0 * i["x"])
    g = stage.vjp(p, i, {"y": np.ones(3)})
    np.testing.assert_allclose(g["a"], 14.0)
    np.testing.assert_allclose(g["x"], 4.0 * i["x"])


def test_stage_without_derivatives_says_so():
    class ApplyOnly(VjpOnly):
        vjp = Stage.vjp

    with pytest.raises(errors.StageError, match="implements none"):
        ApplyOnly().jacobian({"a": np.float64(1)}, {"x": np.ones(3)})


def test_wrt_validation_and_pipeline_name_clashes():
    histo, obj = make_stages()
    with pytest.raises(errors.StageError, match="int32, not differentiable"):
        histo.jacobian(PARAMS, _events(), wrt=["is_signal"])
    with pytest.raises(errors.StageError, match="not declared differentiable"):
        histo.jacobian(PARAMS, _events(), wrt=["feat"])
    with pytest.raises(errors.StageError, match="produced twice"):
        Pipeline([histo, histo])
    nondiff = JaxStage(objective_fn, {"lumi": np.float32(1.0)}, {"yields": np.zeros((2, N_BINS), np.float32)})
    with pytest.raises(errors.StageError, match="not differentiable"):
        Pipeline([histo, nondiff]).jacobian(ALL_PARAMS, _events())


def test_remote_stage_errors_are_protocol_errors():
    histo, _ = make_stages()
    remote = RemoteStage(InProcessTransport(histo))
    with pytest.raises(errors.StageError, match="missing parameters"):
        remote.apply({"cut": PARAMS["cut"]}, _events())


def _dask_stage():
    return make_stages()[0]


def test_dask_transport_carries_the_same_bytes():
    ref = f"{__name__}:_dask_stage"
    ev = _events()
    local = RemoteStage(InProcessTransport(_dask_stage()))
    remote = RemoteStage(DaskTransport(ref))  # dask.delayed on the default scheduler
    o1, j1 = local.jacobian(PARAMS, ev)
    o2, j2 = remote.jacobian(PARAMS, ev)
    np.testing.assert_array_equal(j1["yields"], j2["yields"])
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        remote = RemoteStage(DaskTransport(ref, client, timeout=60))
        o3, j3 = remote.jacobian(PARAMS, ev)
        np.testing.assert_array_equal(j1["yields"], j3["yields"])
        with pytest.raises(errors.StageError, match="cannot load stage"):
            RemoteStage(DaskTransport("no_such_module_xyz:stage", client, timeout=60))
