"""Build the golden protocol messages; run this file to (re)write the ``*.jcna`` files.

    /tmp/venv/bin/python tests/golden/protocol/make_golden.py

The tests decode every file, compare it with :func:`golden_messages` and
re-encode it byte-identically, so a change to the wire format shows up as a
diff of these files (and needs a protocol version decision).
"""

from __future__ import annotations

import pathlib

import numpy as np

from jacana.protocol.message import DTYPES, Message, encode, params_digest
from jacana.protocol.provenance import Provenance

HERE = pathlib.Path(__file__).parent


def golden_messages() -> dict[str, Message]:
    params = {"a": np.float64(2.0), "b": np.float64(0.5)}
    x = np.array([0.0, 1.0, 2.0, 3.0])
    y = 2.0 * x**2 + 0.5
    digest = params_digest(params)
    prov = (Provenance("root://eos/ttbar__nominal_0.root", 0, 4, 4),)
    common = dict(stage="quadratic", step=7, params_digest=digest, provenance=prov)
    req = dict(common, param_names=("a", "b"))
    jac = np.concatenate([(x**2)[:, None], np.ones((4, 1)), np.diag(4.0 * x)], axis=1)
    spec = {
        "stage": "quadratic",
        "params": [{"name": "a", "shape": [], "dtype": "float64"}, {"name": "b", "shape": [], "dtype": "float64"}],
        "inputs": [{"name": "x", "shape": [4], "dtype": "float64", "differentiable": True}],
        "outputs": [{"name": "y", "shape": [4], "dtype": "float64", "axes": ["bin"]}],
    }
    rng = np.random.default_rng(5)
    zoo = {}
    for i, dt in enumerate(DTYPES):
        shape = [(), (3,), (2, 3), (0,), (2, 1, 2)][i % 5]
        if dt == "bool":
            zoo[f"t_{dt}"] = rng.integers(0, 2, size=shape).astype(bool)
        elif dt.startswith("complex"):
            zoo[f"t_{dt}"] = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dt)
        elif dt.startswith("float"):
            zoo[f"t_{dt}"] = rng.normal(size=shape).astype(dt)
        else:
            info = np.iinfo(dt)
            zoo[f"t_{dt}"] = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    return {
        "hello_request": Message("hello", meta={"token": "golden-example-token-0123456789"}),
        "hello_response": Message("hello", role="response", stage="quadratic", meta={"stage": "quadratic", "max_bytes": 268435456}),
        "describe_request": Message("describe", stage="quadratic", meta={"inputs": [spec["inputs"][0]]}),
        "describe_response": Message("describe", role="response", stage="quadratic", meta={"spec": spec}),
        "apply_request": Message("apply", {**params, "x": x}, **req),
        "apply_response": Message("apply", {"y": y}, role="response", axes={"y": ("bin",)}, **common),
        "jacobian_request": Message("jacobian", {**params, "x": x}, wrt=("a", "b", "x"), **req),
        "jacobian_response": Message("jacobian", {"y": y, "jacobian:y": jac}, role="response", wrt=("a", "b", "x"),
                                     axes={"y": ("bin",), "jacobian:y": ("bin", "wrt")}, **common),
        "jvp_request": Message("jvp", {**params, "x": x, "tangent:a": np.float64(1.0)}, **req),
        "jvp_response": Message("jvp", {"y": y, "tangent:y": x**2}, role="response", **common),
        "vjp_request": Message("vjp", {**params, "x": x, "cotangent:y": np.ones(4)}, wrt=("a", "x"), **req),
        "vjp_response": Message("vjp", {"cotangent:a": np.float64((x**2).sum()), "cotangent:x": 4.0 * x},
                                role="response", wrt=("a", "x"), **common),
        "error_response": Message("error", role="response", stage="quadratic", step=7,
                                  meta={"error": {"code": "stage", "message": "missing tensor b"}}),
        "dtypes": Message("apply", zoo, role="response", stage="dtype-zoo"),
    }


def main() -> None:
    for name, msg in golden_messages().items():
        (HERE / f"{name}.jcna").write_bytes(encode(msg))
        print(f"wrote {name}.jcna")


if __name__ == "__main__":
    main()
