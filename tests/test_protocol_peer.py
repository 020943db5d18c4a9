"""A non-Python peer (Node.js) speaks the protocol and composes into a differentiable pipeline."""

from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np
import pytest

from jacana.protocol import errors
from jacana.protocol.message import Message
from jacana.protocol.pipeline import Pipeline, as_jax_function
from jacana.protocol.rpc import RemoteStage
from jacana.protocol.stage import JaxStage
from jacana.protocol.transport import SubprocessTransport

PEER = pathlib.Path(__file__).parents[1] / "protocol" / "peers" / "stage.js"
GOLDEN = pathlib.Path(__file__).parent / "golden" / "protocol"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js (node) is not installed; the JavaScript peer cannot run")

X = np.array([-1.0, 0.5, 1.5, 2.0])
PARAMS = {"a": np.float64(0.7), "b": np.float64(-0.3)}


@pytest.fixture(scope="module")
def peer():
    with SubprocessTransport([NODE, str(PEER), "--n", "4"], timeout=20) as transport:
        yield RemoteStage(transport, step=1)


def loss_stage():
    return JaxStage(lambda p, i: {"loss": (i["y"] ** 2 * i["w"]).sum()}, {},
                    {"y": np.zeros(4, np.float32), "w": np.ones(4, np.float32)}, differentiable_inputs=["y"],
                    stage_id="weighted-sum-of-squares")


def numpy_loss(params, x):
    y = params["a"] * x**2 + params["b"]
    return float(np.sum(y**2 * np.arange(1, 5)))


def test_peer_describes_itself(peer):
    spec = peer.describe()
    assert spec.stage == "quadratic" and spec.param_names == ("a", "b") and spec.diff_args == ("a", "b", "x")
    assert peer.describe({"x": spec.inputs[0].__class__("x", (7,), "float64")}).outputs[0].shape == (7,)


@pytest.mark.parametrize("mode", ["jacobian", "vjp"])
def test_peer_gradient_matches_finite_differences(peer, mode):
    w = np.arange(1, 5, dtype=np.float32)
    f = as_jax_function(Pipeline([peer, loss_stage()]), mode=mode)
    value, grads = jax.value_and_grad(lambda p: f(p, {"x": X, "w": w})["loss"])(PARAMS)
    np.testing.assert_allclose(value, numpy_loss(PARAMS, X), rtol=1e-5)
    eps = 1e-5
    for name in PARAMS:
        up = {**PARAMS, name: PARAMS[name] + eps}
        down = {**PARAMS, name: PARAMS[name] - eps}
        fd = (numpy_loss(up, X) - numpy_loss(down, X)) / (2 * eps)
        np.testing.assert_allclose(grads[name], fd, rtol=1e-4, err_msg=name)


def test_peer_derivatives_agree_with_each_other(peer):
    outs, jac = peer.jacobian(PARAMS, {"x": X})
    g = peer.vjp(PARAMS, {"x": X}, {"y": np.ones(4)})
    packed = np.concatenate([np.atleast_1d(g["a"]), np.atleast_1d(g["b"]), g["x"]])
    np.testing.assert_allclose(packed, jac["y"].sum(axis=0))
    _, t = peer.jvp(PARAMS, {"x": X}, {"x": np.ones(4)})
    np.testing.assert_allclose(t["y"], jac["y"][:, 2:].sum(axis=1))


def test_peer_reads_python_golden_messages_and_checks_digest(peer):
    from jacana.protocol.message import decode

    golden = decode((GOLDEN / "jacobian_request.jcna").read_bytes())
    reply = peer.transport.request(golden)
    expected = decode((GOLDEN / "jacobian_response.jcna").read_bytes())
    assert reply.kind == "jacobian" and reply.params_digest == golden.params_digest
    np.testing.assert_array_equal(reply.tensors["jacobian:y"], expected.tensors["jacobian:y"])
    tampered = Message(golden.kind, {**golden.tensors, "a": np.float64(9.0)}, param_names=golden.param_names,
                       params_digest=golden.params_digest, wrt=golden.wrt)
    reply = peer.transport.request(tampered)
    assert reply.kind == "error" and reply.meta["error"]["code"] == "malformed"


def test_peer_answers_bad_requests_with_protocol_errors(peer):
    with pytest.raises(errors.UnsupportedDType):
        peer.apply({"a": np.int32(1), "b": np.float64(0)}, {"x": X})
    assert peer.transport.request_bytes(b"garbage")[8:12] != b""  # answered, still alive
    with pytest.raises(errors.StageError):
        peer.apply({"a": np.float64(1)}, {"x": X})
