"""Hard limit of the soft analysis: every histogram equals the conventional awkward + hist analysis.

With every temperature and the bandwidth at zero, ``jacana.stages.analysis`` must reproduce
``jacana.stages.reference.fill_histograms`` for every sample, region and variation to 1e-9
(relative), on adversarial hand-made events, on synthetic samples and on the real NanoAOD file.
"""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest

from jacana.stages import reference
from jacana.stages.analysis import soft_histograms
from jacana.stages.batch import make_batches
from jacana.stages.shapes import jet_bucket
from jacana.stages.columns import Columns, jer_factors, read_chunk
from jacana.stages.fileset import Chunk, load_fileset
from jacana.stages.spec import NOMINAL, load_spec

RTOL = 1e-9


def assert_parity(columns, spec, prefilter=False, dtype=np.float64):
    """Soft hard-limit histograms == reference histograms for every region and variation."""
    ref = reference.fill_histograms(columns, spec)
    soft = soft_histograms(make_batches(columns, spec, dtype=dtype, prefilter=prefilter), spec)
    assert set(soft) == set(ref)
    filled = 0
    for region, by_var in ref.items():
        assert set(soft[region]) == set(by_var), region
        for var, h in by_var.items():
            want = reference.to_arrays(h)
            got = soft[region][var]
            np.testing.assert_array_equal(got["edges"], want["edges"])
            for key in ("sumw", "sumw2"):
                np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=0,
                                           err_msg=f"{columns.chunk.sample}/{columns.chunk.variation} {region} {var} {key}")
            filled += int(np.count_nonzero(want["sumw"]))
    return filled


# -- adversarial hand-made events --------------------------------------------------------------------

def _columns(events, spec, variation=NOMINAL, sample="ttbar", path="adversarial.root"):
    """Columns from a list of per-event dicts (missing collections are empty)."""
    def col(coll, field, dtype):
        return ak.values_astype(ak.Array([[o[field] for o in ev.get(coll, [])] for ev in events]), dtype)

    arrays = {
        "electron_pt": col("el", "pt", np.float32), "electron_eta": col("el", "eta", np.float32),
        "electron_phi": col("el", "phi", np.float32), "electron_mass": col("el", "m", np.float32),
        "electron_id": col("el", "id", np.int32), "electron_sip3d": col("el", "sip", np.float32),
        "muon_pt": col("mu", "pt", np.float32), "muon_eta": col("mu", "eta", np.float32),
        "muon_phi": col("mu", "phi", np.float32), "muon_mass": col("mu", "m", np.float32),
        "muon_id": col("mu", "id", bool), "muon_sip3d": col("mu", "sip", np.float32),
        "muon_iso": col("mu", "iso", np.float32),
        "jet_pt": col("jet", "pt", np.float32), "jet_eta": col("jet", "eta", np.float32),
        "jet_phi": col("jet", "phi", np.float32), "jet_mass": col("jet", "m", np.float32),
        "jet_btag": col("jet", "b", np.float32), "jet_id": col("jet", "id", np.int32),
        "gen_weight": ak.Array(np.array([ev.get("gw", 1.0) for ev in events], dtype=np.float32)),
    }
    counts = ak.to_numpy(ak.num(arrays["jet_pt"], axis=1))
    jer = spec.systematics_of("jet_pt_smear")[0].options
    flat = jer_factors(path, 0, counts, float(jer["sigma"]), int(jer["seed"]))
    chunk = Chunk(sample, variation, path, 0, len(events), 1000)
    return Columns(chunk=chunk, arrays=arrays, jer_factor=ak.unflatten(flat, counts))


def _jet(pt, eta=0.5, phi=0.0, m=8.0, b=0.1, id=6):
    return {"pt": pt, "eta": eta, "phi": phi, "m": m, "b": b, "id": id}


def _ele(pt, eta=0.3, id=4, sip=1.0):
    return {"pt": pt, "eta": eta, "phi": 0.1, "m": 0.0005, "id": id, "sip": sip}


def _mu(pt, eta=0.3, id=True, sip=1.0, iso=0.05):
    return {"pt": pt, "eta": eta, "phi": 0.2, "m": 0.105, "id": id, "sip": sip, "iso": iso}


def adversarial_events(rng):
    """Events at every edge the hard analysis has: thresholds, ties, bin edges, big multiplicities."""
    ev = []
    four = [_jet(60, phi=0.0, b=0.9), _jet(50, phi=2.0), _jet(45, phi=-2.0, b=0.8), _jet(40, phi=1.0)]
    ev.append({"el": [_ele(40)], "jet": four})                                   # 4j2b
    ev.append({"el": [_ele(30.0)], "jet": four})                                 # lepton exactly at threshold: fails
    ev.append({"mu": [_mu(30.5)], "jet": four, "gw": -3.0})                      # negative genWeight
    ev.append({"el": [_ele(40)], "mu": [_mu(40)], "jet": four})                  # two leptons: fails
    ev.append({"el": [_ele(40, id=3)], "mu": [_mu(40, iso=0.2)], "jet": four})   # IDs fail: no lepton
    ev.append({"el": [_ele(40)], "jet": four[:3] + [_jet(30.0)]})                # jet exactly at threshold: fails
    ev.append({"el": [_ele(40)], "jet": four[:3] + [_jet(30.5, eta=2.4)]})        # |eta| exactly at the cut
    ev.append({"el": [_ele(40)], "jet": four[:3] + [_jet(31, eta=-2.3)]})
    ev.append({"el": [_ele(40)], "jet": four[:3] + [_jet(31, id=2)]})             # jetId fails
    ev.append({"el": [_ele(40)], "jet": [dict(j, b=0.5) for j in four]})         # btag exactly at threshold
    ev.append({"el": [_ele(40)], "jet": [dict(j, b=-10.0) for j in four]})       # no btag value: 0 tags
    ev.append({"el": [_ele(40)], "jet": [_jet(40, phi=0.0, b=0.9), _jet(40, phi=2.0944), _jet(40, phi=-2.0944),
                                         _jet(30.5)]})
    # HT exactly on bin edges (110, 150, 550): float32-exact values
    ev.append({"el": [_ele(40)], "jet": [_jet(35.0), _jet(35.0, phi=1), _jet(40.0, phi=2, b=0.9), _jet(40.0, phi=3)]})
    ev.append({"el": [_ele(40)], "jet": [_jet(137.5), _jet(137.5, phi=1), _jet(137.5, phi=2, b=0.9), _jet(137.5, phi=3)]})
    ev.append({"el": [_ele(40)], "jet": [_jet(27.5, phi=a, b=0.9 if a == 0 else 0.1) for a in range(4)]})
    # trijet pT tie with different masses: jets 1 and 2 equal in pT and phi, different eta
    ev.append({"el": [_ele(40)], "jet": [_jet(80, phi=0.0, b=0.9), _jet(50, eta=0.0, phi=2.5), _jet(50, eta=1.5, phi=2.5),
                                         _jet(45, phi=-1.5, b=0.9), _jet(35, phi=1.0)]})
    # many jets (bucket growth, never truncated) and no jets at all
    many = [_jet(float(x), eta=float(e), phi=float(p), b=float(b)) for x, e, p, b in
            zip(rng.uniform(20, 150, 21), rng.uniform(-2.6, 2.6, 21), rng.uniform(-3, 3, 21), rng.uniform(0, 1, 21))]
    ev.append({"mu": [_mu(50)], "jet": many})
    ev.append({"mu": [_mu(50)]})
    ev.append({})
    # random events around the thresholds
    for _ in range(150):
        nj = int(rng.integers(0, 10))
        jets = [_jet(float(np.float32(rng.choice([rng.uniform(15, 200), 30.0, 30.5]))), eta=float(rng.uniform(-2.6, 2.6)),
                     phi=float(rng.uniform(-3.14, 3.14)), m=float(rng.uniform(2, 20)),
                     b=float(rng.choice([rng.uniform(0, 1), -10.0, 0.5])), id=int(rng.choice([6, 6, 6, 2])))
                for _ in range(nj)]
        leps = {"el": [_ele(float(rng.uniform(20, 80)), id=int(rng.choice([4, 4, 2])))] if rng.uniform() < 0.6 else [],
                "mu": [_mu(float(rng.uniform(20, 80)))] if rng.uniform() < 0.5 else []}
        ev.append({**leps, "jet": jets, "gw": float(rng.choice([1.0, -1.0], p=[0.9, 0.1]))})
    return ev


def test_adversarial_events_nominal_and_alternative():
    spec = load_spec()
    events = adversarial_events(np.random.default_rng(11))
    cols = _columns(events, spec)
    assert jet_bucket(21) == 24
    assert max(p.n_jets for p in make_batches(cols, spec).parts) == 24  # the 21-jet event: no truncation
    assert assert_parity(cols, spec) > 0
    assert assert_parity(cols, spec, prefilter=True) > 0
    assert assert_parity(_columns(events, spec, variation="ME_var"), spec) > 0


def test_adversarial_events_other_parameters():
    spec = load_spec(overrides=["jet_pt_min=25", "btag_min=0.3", "jet_eta_max=2.0", "lepton_pt_min=35"])
    cols = _columns(adversarial_events(np.random.default_rng(12)), spec)
    assert assert_parity(cols, spec) > 0


def test_prefilter_drops_only_hopeless_events():
    spec = load_spec()
    cols = _columns(adversarial_events(np.random.default_rng(13)), spec)
    full = make_batches(cols, spec)
    kept = make_batches(cols, spec, prefilter=True)
    n_real = lambda b: sum(int(np.sum(p.event_mask)) for p in b.parts)  # noqa: E731
    assert n_real(full) == len(cols) and n_real(kept) < len(cols)


def test_unpadded_batches_regroup_into_the_same_calls():
    """The executors densify without padding (rebatch drops padding events): same calls, fewer bytes."""
    import dataclasses

    from jacana.facility.executor import rebatch

    spec = load_spec()
    cols = _columns(adversarial_events(np.random.default_rng(14)), spec)
    padded, exact = make_batches(cols, spec, prefilter=True), make_batches(cols, spec, prefilter=True, pad=False)
    assert all(p.n_padded == int(np.sum(p.event_mask)) for p in exact.parts)
    assert sum(p.n_padded for p in exact.parts) < sum(p.n_padded for p in padded.parts)
    a, b = rebatch(padded.parts), rebatch(exact.parts)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for f in dataclasses.fields(x):
            np.testing.assert_array_equal(np.asarray(getattr(x, f.name)), np.asarray(getattr(y, f.name)))


# -- synthetic samples ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_fileset(tmp_path_factory):
    from jacana.samples.synthetic import generate

    return generate(tmp_path_factory.mktemp("soft_synthetic"), events=1500, seed=21, files_per_sample=1, progress=False)


def test_synthetic_every_sample_region_variation(tiny_fileset):
    spec = load_spec()
    fileset = load_fileset(tiny_fileset)
    filled = 0
    for sample in spec.samples:
        for variation in spec.file_variations(sample):
            if not fileset.has(sample, variation):
                continue
            for chunk in fileset.chunks(sample, variation, chunk_size=10_000):
                filled += assert_parity(read_chunk(chunk, spec), spec)
    assert filled > 50


@pytest.mark.slow
def test_synthetic_session_fileset(small_fileset):
    """The 60k-event session dataset, every chunk (slow: many shapes compile)."""
    spec = load_spec()
    fileset = load_fileset(small_fileset)
    for sample in spec.samples:
        for variation in spec.file_variations(sample):
            if fileset.has(sample, variation):
                for chunk in fileset.chunks(sample, variation, chunk_size=20_000):
                    assert_parity(read_chunk(chunk, spec), spec, prefilter=True)


# -- the real NanoAOD file ---------------------------------------------------------------------------

# About one event passes the AGC selection: loosen until both regions are filled.
REAL_LOOSE = ["jet_pt_min=20", "lepton_pt_min=25", "cuts.min_jets=3"]


@pytest.mark.parametrize("btag_min", [0.2, 0.5])  # all events in 4j2b / all in 4j1b
def test_real_nanoaod(real_nanoaod, btag_min):
    spec = load_spec(overrides=REAL_LOOSE + [f"btag_min={btag_min}"])
    chunk = Chunk("ttbar", NOMINAL, real_nanoaod, 0, 200, 200)
    cols = read_chunk(chunk, spec)
    assert assert_parity(cols, spec) > 0


def test_real_nanoaod_both_regions_filled(real_nanoaod):
    """At btag_min = 0.3 the loosened selection puts events in both regions (sumw2 > 0: some have genWeight < 0)."""
    spec = load_spec(overrides=REAL_LOOSE + ["btag_min=0.3"])
    cols = read_chunk(Chunk("ttbar", NOMINAL, real_nanoaod, 0, 200, 200), spec)
    ref = reference.fill_histograms(cols, spec)
    assert all(reference.to_arrays(ref[r][NOMINAL])["sumw2"].sum() > 0 for r in ref)
    assert assert_parity(cols, spec) > 0


def test_float32_batches_run_and_agree_loosely():
    """float32 (for speed) gives the hard histograms up to float32 rounding of cuts and bin edges."""
    spec = load_spec()
    cols = _columns(adversarial_events(np.random.default_rng(14))[:19], spec)  # the hand-made edge cases
    ref = reference.fill_histograms(cols, spec)
    soft = soft_histograms(make_batches(cols, spec, dtype=np.float32), spec)
    for region, by_var in ref.items():
        for var, h in by_var.items():
            np.testing.assert_allclose(soft[region][var]["sumw"], reference.to_arrays(h)["sumw"], rtol=1e-5)
