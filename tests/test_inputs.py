"""Bad inputs get clear errors naming the file and the thing; skip policy records, never corrects."""

from __future__ import annotations

import json
import shutil

import awkward as ak
import numpy as np
import pytest
import uproot

from jacana.analysis.evaluate import hard_evaluation
from jacana.facility.hardrun import InputReport, hard_histograms
from jacana.stages.columns import read_chunk
from jacana.stages.errors import FilesetError, InputFileError, MissingBranchError
from jacana.stages.fileset import Chunk, load_fileset, parse_fileset
from jacana.stages.reference import fill_histograms, to_arrays
from jacana.stages.spec import load_spec

SPEC = load_spec()


def nanoaod_like(n_events: int, seed: int = 0, jets_per_event: int = 5) -> dict:
    """A minimal NanoAOD-like record of every branch the AGC config reads."""
    rng = np.random.default_rng(seed)

    def coll(counts, fields):
        total = int(counts.sum())
        return {k: ak.unflatten(f(total), counts) for k, f in fields.items()}

    nj = np.full(n_events, jets_per_event)
    ne = np.ones(n_events, dtype=np.int64)
    nm = np.zeros(n_events, dtype=np.int64)
    f32 = lambda lo, hi: (lambda n: rng.uniform(lo, hi, n).astype(np.float32))  # noqa: E731
    jets = coll(nj, {"pt": f32(25, 200), "eta": f32(-2.5, 2.5), "phi": f32(-3, 3), "mass": f32(5, 20),
                     "btagCSVV2": f32(0, 1), "jetId": lambda n: np.full(n, 6, np.int32)})
    ele = coll(ne, {"pt": f32(35, 80), "eta": f32(-2, 2), "phi": f32(-3, 3), "mass": f32(0, 0.001),
                    "cutBased": lambda n: np.full(n, 4, np.int32), "sip3d": f32(0, 2)})
    mu = coll(nm, {"pt": f32(35, 80), "eta": f32(-2, 2), "phi": f32(-3, 3), "mass": f32(0.1, 0.11),
                   "tightId": lambda n: np.ones(n, bool), "sip3d": f32(0, 2), "pfRelIso04_all": f32(0, 0.1)})
    return {"Jet": ak.zip(jets), "Electron": ak.zip(ele), "Muon": ak.zip(mu),
            "genWeight": np.ones(n_events, np.float32)}


def write_file(path, record, tree="Events"):
    with uproot.recreate(path) as f:
        f.mktree(tree, {k: v.type if isinstance(v, ak.Array) else v.dtype for k, v in record.items()})
        f[tree].extend(record)
    return str(path)


def chunk_of(path, n=50, sample="ttbar", variation="nominal"):
    return Chunk(sample, variation, str(path), 0, n, n)


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match=r"nope\.root: file does not exist"):
        read_chunk(chunk_of(tmp_path / "nope.root"), SPEC)


def test_not_a_root_file(tmp_path):
    bad = tmp_path / "garbage.root"
    bad.write_bytes(b"this is not ROOT" * 100)
    with pytest.raises(InputFileError, match=r"garbage\.root: cannot open as a ROOT file"):
        read_chunk(chunk_of(bad), SPEC)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_file(tmp_path, fraction):
    good = write_file(tmp_path / "good.root", nanoaod_like(2000))
    data = open(good, "rb").read()
    cut = tmp_path / "cut.root"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputFileError, match=r"cut\.root"):
        read_chunk(chunk_of(cut, 2000), SPEC)


def test_missing_tree_names_what_is_there(tmp_path):
    path = write_file(tmp_path / "t.root", nanoaod_like(10), tree="Events2")
    with pytest.raises(InputFileError, match=r"no tree 'Events'.*Events2"):
        read_chunk(chunk_of(path, 10), SPEC)


def test_missing_branch_names_branch_file_and_closest(tmp_path):
    record = nanoaod_like(10)
    record["Jet"] = ak.zip({k: record["Jet"][k] for k in record["Jet"].fields if k != "btagCSVV2"}
                           | {"btagDeepB": record["Jet"]["btagCSVV2"]})
    path = write_file(tmp_path / "run3.root", record)
    with pytest.raises(MissingBranchError) as info:
        read_chunk(chunk_of(path, 10), SPEC)
    assert info.value.branch == "Jet_btagCSVV2" and "run3.root" in str(info.value)
    assert "Jet_btagDeepB" in info.value.suggestions
    # ... and the config names the branch instead: the analysis runs.
    columns = read_chunk(chunk_of(path, 10), load_spec(overrides=["branches.jet_btag=Jet_btagDeepB"]))
    assert len(columns) == 10


def test_branch_of_wrong_type(tmp_path):
    record = nanoaod_like(10)
    record["genWeight"] = ak.Array([[1.0]] * 10)  # jagged where one number per event is expected
    path = write_file(tmp_path / "wrong.root", record)
    with pytest.raises(InputFileError, match=r"wrong\.root: branch 'genWeight' .* one number per event"):
        read_chunk(chunk_of(path, 10), SPEC)


def test_fileset_nevts_beyond_the_tree(tmp_path):
    path = write_file(tmp_path / "short.root", nanoaod_like(10))
    with pytest.raises(InputFileError, match=r"short\.root: needs entries up to 50 but the tree has 10"):
        read_chunk(chunk_of(path, 50), SPEC)


def test_empty_file_and_events_without_objects(tmp_path):
    empty = write_file(tmp_path / "empty.root", nanoaod_like(0))
    hists = fill_histograms(read_chunk(Chunk("ttbar", "nominal", empty, 0, 0, 1), SPEC), SPEC)
    assert all(to_arrays(h)["sumw"].sum() == 0 for r in hists.values() for h in r.values())
    bare = write_file(tmp_path / "bare.root", nanoaod_like(20, jets_per_event=0))
    hists = fill_histograms(read_chunk(chunk_of(bare, 20), SPEC), SPEC)
    assert all(to_arrays(h)["sumw"].sum() == 0 for r in hists.values() for h in r.values())


def test_nonfinite_values_are_masked_counted_and_never_propagate(tmp_path):
    record = nanoaod_like(200, seed=3)
    pt = np.asarray(ak.flatten(record["Jet"]["pt"])).copy()
    pt[::7] = np.nan
    pt[3] = np.inf
    counts = ak.num(record["Jet"]["pt"])
    record["Jet"] = ak.zip({**{k: record["Jet"][k] for k in record["Jet"].fields}, "pt": ak.unflatten(pt, counts)})
    gw = np.ones(200, np.float32)
    gw[5] = np.nan
    record["genWeight"] = gw
    path = write_file(tmp_path / "nan.root", record)
    with pytest.raises(InputFileError, match="branch 'Jet_pt' has"):  # 1 in 7 jets: more than the default 1 %
        read_chunk(chunk_of(path, 200), SPEC)
    lenient = SPEC.masking_nonfinite()
    columns = read_chunk(chunk_of(path, 200), lenient)
    assert columns.nonfinite == {"Jet_pt": int(np.sum(~np.isfinite(pt))), "genWeight": 1}
    hists = fill_histograms(columns, lenient)
    for region in hists.values():
        for h in region.values():
            arr = to_arrays(h)
            assert np.all(np.isfinite(arr["sumw"])) and np.all(np.isfinite(arr["sumw2"]))
    assert sum(to_arrays(hists[r]["nominal"])["sumw"].sum() for r in hists) > 0


def test_fileset_errors(tmp_path):
    with pytest.raises(FilesetError, match="does not exist"):
        load_fileset(tmp_path / "none.json")
    with pytest.raises(FilesetError, match="needs an event count"):
        parse_fileset({"ttbar": {"nominal": {"files": ["a.root"]}}})
    with pytest.raises(FilesetError, match="file list is empty"):
        parse_fileset({"ttbar": {"nominal": {"files": []}}})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FilesetError, match="not valid JSON"):
        load_fileset(tmp_path / "bad.json")


def test_skip_policy_records_every_skipped_file_and_corrects_nothing(small_fileset, small_fileset_evaluated,
                                                                     tmp_path):
    raw = json.loads(small_fileset.read_text())
    work = tmp_path / "copy"
    shutil.copytree(small_fileset.parent, work)
    victims = [raw["wjets"]["nominal"]["files"][0]["path"], raw["ttbar"]["ME_var"]["files"][-1]["path"]]
    (work / victims[0]).unlink()
    (work / victims[1]).write_bytes(b"\0" * 100)
    fileset = load_fileset(work / "fileset.json")
    with pytest.raises(InputFileError, match=victims[1]):  # the first bad file in analysis order
        hard_evaluation(SPEC, fileset)
    skipped = hard_evaluation(SPEC, fileset, on_bad_file="skip")
    inputs = skipped["result"]["inputs"]
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in inputs["skipped_files"]) == sorted(victims)
    # every file read: `jacana evaluate` of the same fileset and config (hard_evaluation's result, once per session)
    full = json.loads((small_fileset_evaluated / "result.json").read_text())
    assert full["params"] == SPEC.param_values() and full["inputs"]["skipped_files"] == []
    # Nothing re-weighted: W+jets lost exactly the skipped file's events, no more, no less.
    assert 0 < sum(skipped["result"]["regions"][r]["wjets"] for r in SPEC.regions) \
        <= sum(full["regions"][r]["wjets"] for r in SPEC.regions)
    assert skipped["result"]["regions"]["4j2b"]["ttbar"] == pytest.approx(full["regions"]["4j2b"]["ttbar"])


def test_unknown_policy_is_a_config_error():
    from jacana.stages.errors import ConfigError

    with pytest.raises(ConfigError, match="on_bad_file"):
        InputReport("ignore")
    with pytest.raises(ConfigError):
        hard_histograms(SPEC, [], report=InputReport("retry"))


def test_read_ahead_keeps_order_bounds_work_in_flight_and_hands_each_error_to_its_chunk():
    import threading
    import time as _time

    from jacana.stages.columns import read_ahead
    from jacana.stages.errors import InputFileError

    chunks = [Chunk("ttbar", "nominal", f"/no/file_{i}.root", 0, 10, 10) for i in range(7)]
    started, lock = [], threading.Lock()

    def reader(chunk, spec):
        with lock:
            started.append(chunk.path)
        _time.sleep(0.01)
        if chunk.path.endswith("_3.root"):
            raise InputFileError(chunk.path, "corrupt")
        return chunk.path

    seen = []
    for k, (chunk, future) in enumerate(read_ahead(chunks, SPEC, depth=2, reader=reader)):
        assert len(started) <= k + 3  # never more than depth + 1 chunks ahead of the consumer
        if chunk.path.endswith("_3.root"):
            with pytest.raises(InputFileError, match="file_3.root.*corrupt"):
                future.result()
        else:
            assert future.result() == chunk.path
        seen.append(chunk.path)
    assert seen == [c.path for c in chunks]

    # a consumer that stops early leaves no read running
    gen = read_ahead(chunks, SPEC, depth=2, reader=reader)
    next(gen)
    gen.close()
    assert len(started) <= 7 + 3
