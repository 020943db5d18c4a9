"""Benchmark: encode + decode of an AGC-sized Jacobian message.

The message is a ``jacobian`` response with yields of shape
2 regions x 9 samples x 10 variations x 25 bins (float64) and their packed
Jacobian with respect to 10 named parameters, plus one provenance record.
The baseline, measured in the same run, is the bare copy of the same arrays
to bytes and back (``tobytes`` + ``frombuffer``)::

    /tmp/venv/bin/python -m jacana.bench.message --repeats 500

    >>> r = bench_message(repeats=3)
    >>> r["header_bytes"] < 1024 and r["total_bytes"] > r["raw_bytes"]
    True
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from jacana.protocol.message import PREFIX, Message, decode, decode_header, encode, params_digest
from jacana.protocol.provenance import Provenance

PARAM_NAMES = (
    "lep_pt_min", "jet_pt_min", "jet_eta_max", "btag_wp", "n_jets_min",
    "n_btag_min", "mjj_lo", "mjj_hi", "bin_lo", "bandwidth",
)
AXES = ("region", "sample", "variation", "bin")
SHAPE = (2, 9, 10, 25)


def agc_message(dtype: str = "float64") -> Message:
    """The benchmark message (deterministic values)."""
    rng = np.random.default_rng(0)
    yields = rng.gamma(2.0, 50.0, size=SHAPE).astype(dtype)
    jac = rng.normal(size=SHAPE + (len(PARAM_NAMES),)).astype(dtype)
    params = {n: np.float64(i) for i, n in enumerate(PARAM_NAMES)}
    return Message(
        "jacobian",
        {"yields": yields, "jacobian:yields": jac},
        role="response",
        stage="agc-ttbar-histograms",
        step=123,
        params_digest=params_digest(params),
        wrt=PARAM_NAMES,
        axes={"yields": AXES, "jacobian:yields": AXES + ("wrt",)},
        provenance=(Provenance("root://eospublic.cern.ch//eos/opendata/cms/ttbar_nominal_000.root", 0, 500000, 500000),),
    )


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_message(repeats: int = 200, dtype: str = "float64") -> dict:
    """Sizes (bytes) and median times (seconds) for the AGC-sized message."""
    msg = agc_message(dtype)
    data = encode(msg)
    assert decode(data) == msg
    header, start = decode_header(data)
    raw = sum(np.asarray(v).nbytes for v in msg.tensors.values())
    arrays = list(msg.tensors.values())

    def baseline():
        blobs = [a.tobytes() for a in arrays]
        return [np.frombuffer(b, a.dtype).reshape(a.shape) for a, b in zip(arrays, blobs)]

    enc = _median_time(lambda: encode(msg), repeats)
    dec = _median_time(lambda: decode(data), repeats)
    dec_copy = _median_time(lambda: decode(data, copy=True), repeats)
    base = _median_time(baseline, repeats)
    return {
        "shape": list(SHAPE),
        "n_params": len(PARAM_NAMES),
        "dtype": dtype,
        "header_bytes": start,  # prefix + padded JSON header
        "header_json_bytes": start - PREFIX.size,
        "total_bytes": len(data),
        "raw_bytes": raw,
        "overhead_bytes": len(data) - raw,
        "encode_s": enc,
        "decode_s": dec,
        "decode_copy_s": dec_copy,
        "encode_decode_s": enc + dec,
        "baseline_copy_s": base,
        "ratio_vs_baseline": (enc + dec) / base if base else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=500)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = p.parse_args(argv)
    r = bench_message(args.repeats, args.dtype)
    print(f"AGC message {' x '.join(map(str, r['shape']))} + {r['n_params']}-parameter Jacobian, {r['dtype']}")
    print(f"  header        {r['header_bytes']:>9d} bytes (JSON {r['header_json_bytes']})")
    print(f"  total         {r['total_bytes']:>9d} bytes; raw arrays {r['raw_bytes']} bytes; overhead {r['overhead_bytes']} bytes"
          f" ({100 * r['overhead_bytes'] / r['raw_bytes']:.2f} %)")
    print(f"  encode        {1e6 * r['encode_s']:9.1f} us (median of {args.repeats})")
    print(f"  decode        {1e6 * r['decode_s']:9.1f} us (zero-copy views); {1e6 * r['decode_copy_s']:.1f} us with copy")
    print(f"  encode+decode {1e6 * r['encode_decode_s']:9.1f} us; bare tobytes+frombuffer baseline {1e6 * r['baseline_copy_s']:.1f} us;"
          f" ratio {r['ratio_vs_baseline']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
