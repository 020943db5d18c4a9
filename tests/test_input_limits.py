"""Hostile and careless inputs (issue #24, item 2): filesets, YAML configs, params.json, non-finite
branches and checkpoints get a clear error naming the file and the key, at once, before any data is
read. Every input here is tiny; no test reads more than 200 events or runs an optimisation step."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
import uproot

from jacana.analysis.evaluate import load_params_file
from jacana.facility.hardrun import InputReport, NonFiniteInputWarning, analysis_chunks, hard_histograms
from jacana.stages.columns import read_chunk
from jacana.stages.errors import ConfigError, FilesetError, InputFileError
from jacana.stages.fileset import load_fileset, parse_fileset
from jacana.stages.spec import MAX_YAML_BYTES, _default_config_path, load_spec

SPEC = load_spec()
CONFIG = _default_config_path().read_text()


def _entries_file(path, n: int, tree: str = "Events") -> str:
    """A ROOT file whose ``tree`` has ``n`` entries (one branch): enough to count entries."""
    with uproot.recreate(path) as f:
        f.mktree(tree, {"x": np.float64})
        f[tree].extend({"x": np.zeros(n)})
    return str(path)


def _fileset(tmp_path, raw, name="fileset.json"):
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return path


def _agc(file_entry, **block):
    return {"ttbar": {"nominal": {"files": [file_entry], **block}}}


# -- filesets ------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, message", [
    ({"ttbar": {"nominal": {"files": 5}}}, r"ttbar/nominal: 'files' must be a list .* got 5 \(int\)"),
    (_agc({"path": "a.root", "nevts": True}), r"file 'a.root': nevts must be an integer, got True \(bool\)"),
    (_agc({"path": "a.root", "nevts": 1e12}), r"file 'a.root': nevts must be an integer, got 1000000000000.0"),
    (_agc({"path": "a.root", "nevts": 10**12}), r"nevts must be between 0 and 1,000,000,000, got 1,000,000,000,000"),
    (_agc({"path": "a.root", "nevts": 10**14}), r"nevts must be between 0 .* got 100,000,000,000,000"),
    (_agc({"path": "a.root", "nevts": -3}), r"nevts must be between 0"),
    (_agc({"path": None, "nevts": 3}), r"ttbar/nominal: file 0: 'path' must be a non-empty string, got None"),
    (_agc({"path": 7, "nevts": 3}), r"'path' must be a non-empty string, got 7"),
    (_agc({"path": "a.root", "nevts": 3}, nevts_total=False), r"nevts_total must be an integer, got False"),
    (_agc({"path": "a.root", "nevts": 0}), r"ttbar/nominal: every file has nevts 0 \(.*a.root\)"),
    ({"ttbar": {"nominal": {"files": [{"path": "a.root", "nevts": 1}]}}, "wjets": 3},
     r"wjets: process 'wjets' must map variations to files, got 3"),
])
def test_malformed_filesets_name_the_file_and_the_key_at_once(tmp_path, raw, message):
    path = _fileset(tmp_path, raw)
    t0 = time.perf_counter()
    with pytest.raises(FilesetError, match=message) as info:
        load_fileset(path)
    assert str(path) in str(info.value)
    assert time.perf_counter() - t0 < 0.5  # 10^12 took 67 s and 2.6 GB (the chunk list), 10^14 hung


def test_a_large_claim_is_checked_against_the_file_before_its_chunk_list_is_built(tmp_path):
    _entries_file(tmp_path / "a.root", 37)
    fileset = load_fileset(_fileset(tmp_path, _agc({"path": "a.root", "nevts": 900_000_000})))
    t0 = time.perf_counter()
    with pytest.raises(FilesetError, match=r"a.root' claims nevts 900,000,000 but its largest tree has 37 entries"):
        fileset.chunks("ttbar", "nominal", chunk_size=100)  # 9 million chunks otherwise
    assert time.perf_counter() - t0 < 1.0


def test_a_fileset_nested_100k_deep_is_refused_without_a_traceback(tmp_path):
    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000):
        with pytest.raises(FilesetError, match="nested too deeply"):
            load_fileset(_fileset(tmp_path, text))


def test_a_sample_whose_every_file_is_empty_is_named_with_its_files_before_any_read(tmp_path):
    raw = {s: {"nominal": {"files": [{"path": f"{s}.root", "nevts": 10}]}} for s in SPEC.samples}
    raw["ttbar"]["nominal"] = {"files": [{"path": "e1.root", "nevts": 0}, {"path": "e2.root", "nevts": 0}],
                               "nevts_total": 1000}
    for v in SPEC.file_variations("ttbar")[1:]:
        raw["ttbar"][v] = {"files": [{"path": f"{v}.root", "nevts": 10}]}
    fileset = load_fileset(_fileset(tmp_path, raw))
    with pytest.raises(FilesetError, match=r"every file of ttbar/nominal \(.*e1.root, .*e2.root\) is empty"):
        analysis_chunks(SPEC, fileset)  # before: "no readable file left ...; skipped: " (an empty list)
    with pytest.raises(FilesetError, match=r"no readable file left for samples .*none of their chunks"):
        hard_histograms(SPEC, [])


# -- coffea's fileset forms (issue #23) ---------------------------------------------------
def test_coffea_filesets_are_read_plain_and_preprocessed(tmp_path):
    a, b = _entries_file(tmp_path / "a.root", 37), _entries_file(tmp_path / "b.root", 5)
    plain = {"tt": {"files": {"a.root": "Events", "b.root": "Events"},
                    "metadata": {"process": "ttbar", "variation": "nominal", "nevts": 1000, "xsec": 729.84}},
             "tt_up": {"files": [a], "treename": "Events", "metadata": {"sample": "ttbar", "variation": "scaleup"}}}
    fs = load_fileset(_fileset(tmp_path, plain))
    assert [(f.path, f.nevts) for f in fs.files("ttbar", "nominal")] == [(a, 37), (b, 5)]  # entries counted
    assert fs.nevts_total("ttbar", "nominal") == 1000 and fs.nevts_total("ttbar", "scaleup") == 37
    assert fs.metadata["ttbar"]["nominal"]["xsec"] == 729.84
    preprocessed = {"tt": {"files": {a: {"object_path": "Events", "steps": [[0, 20], [20, 37]], "num_entries": 37,
                                         "uuid": "u"}}, "metadata": {"sample": "ttbar", "nevts": 500.0}, "form": None}}
    fs = parse_fileset(preprocessed)
    assert fs.files("ttbar", "nominal")[0].nevts == 37 and fs.nevts_total("ttbar", "nominal") == 500
    # jacana's own coffea fileset (facility.coffea_adapter.coffea_fileset) reads back
    own = {"ttbar__nominal": {"files": {a: "Events"}, "metadata": {"sample": "ttbar", "variation": "nominal",
                                                                   "nevts_total": 99}}}
    assert parse_fileset(own).to_dict() == {"ttbar": {"nominal": {"files": [{"path": a, "nevts": 37}],
                                                                  "nevts_total": 99}}}


@pytest.mark.parametrize("block, message", [
    ({"files": {"a.root": "Events"}, "metadata": {"xsec": 1.0}}, r"tt: metadata has no 'sample' key .*\['xsec'\]"),
    ({"files": {"a.root": "Events"}}, r"tt: metadata has no 'sample' key"),
    ({"files": {"a.root": "Tree"}, "metadata": {"sample": "ttbar"}}, r"file 'a.root': cannot count .*no tree 'Tree'"),
    ({"files": {"a.root": {"object_path": "Events", "steps": [[0, 20], [25, 37]], "num_entries": 37}},
      "metadata": {"sample": "ttbar"}}, r"steps\[1\] starts at 25 but the steps before end at 20"),
    ({"files": {"a.root": {"object_path": "Events", "steps": None, "num_entries": None}},
      "metadata": {"sample": "ttbar"}}, r"num_entries is null"),
    ({"files": {"a.root": "Events"}, "metadata": {"sample": "ttbar", "nevts": True}}, r"'nevts' must be an integer"),
    ({"files": {"a.root": "Events"}, "metadata": {"sample": "ttbar", "xsec": "big"}}, r"'xsec' must be a positive"),
    ({"files": 5, "metadata": {"sample": "ttbar"}}, r"tt: 'files' must be a non-empty mapping"),
    ({"files": [{"path": "a.root", "nevts": 3}]}, r"tt: 'files' lists \{'path', 'nevts'\} entries directly under"),
])
def test_coffea_fileset_errors_name_the_dataset_and_the_key(tmp_path, block, message):
    _entries_file(tmp_path / "a.root", 37)
    with pytest.raises(FilesetError, match=message):
        load_fileset(_fileset(tmp_path, {"tt": block}))


def test_two_datasets_of_one_sample_and_mixed_forms_are_refused(tmp_path):
    one = {"files": {"a.root": {"num_entries": 3}}, "metadata": {"sample": "ttbar"}}
    with pytest.raises(FilesetError, match="datasets 'x' and 'y' are both ttbar/nominal"):
        parse_fileset({"x": one, "y": one})
    with pytest.raises(FilesetError, match="wjets: every dataset of a coffea fileset needs 'files'"):
        parse_fileset({"x": one, "wjets": {"nominal": {"files": []}}})


def test_the_coffea_processor_reads_ordinary_coffea_metadata():
    pytest.importorskip("coffea")
    from jacana.facility.coffea_adapter import chunk_of_work_item

    item = {"dataset": "TTToSemiLeptonic", "filename": "/d/tt.root", "treename": "Events", "entrystart": 10,
            "entrystop": 30, "fileuuid": b"u", "process": "ttbar", "variation": "scaleup", "nevts": 1000}
    c = chunk_of_work_item(item)
    assert (c.sample, c.variation, c.entry_start, c.entry_stop, c.nevts_total) == ("ttbar", "scaleup", 10, 30, 1000)
    named = chunk_of_work_item({**{k: item[k] for k in ("filename", "entrystart", "entrystop")},
                                "dataset": "ttbar__ME_var", "nevts_total": 5})
    assert (named.sample, named.variation) == ("ttbar", "ME_var")
    with pytest.raises(InputFileError, match=r"tt.root: coffea dataset 'TTToSemiLeptonic': .* no 'nevts'"):
        chunk_of_work_item({k: v for k, v in item.items() if k != "nevts"})  # before: KeyError 'sample'


# -- YAML configs ------------------------------------------------------------------------------
def _config(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _bomb(levels: int, width: int = 9) -> str:
    """A "billion laughs" in the config's ``name``: width**levels strings from a few lines."""
    lines = ["x0: &x0 [lol]"] + [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines)


def test_a_yaml_alias_bomb_fails_fast(tmp_path):
    path = _config(tmp_path, CONFIG.replace("\nname: agc_ttbar", f"\n{_bomb(9)}\nname: *x9"))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"config.yaml'?: the value at line \d+ expands to more than 200,000"):
        load_spec(path)
    assert time.perf_counter() - t0 < 1.0  # before: > 60 s and 1.8 GB
    with pytest.raises(ConfigError, match="override 'name=.*expands to more than"):
        load_spec(overrides=["name=" + "{" + _bomb(9).replace("\n", ", ") + ", y: *x9}"])
    with pytest.raises(ConfigError, match=r"line 1 contains itself \(a recursive YAML alias\)"):
        load_spec(_config(tmp_path, "name: &a [*a]\n" + CONFIG.replace("\nname: agc_ttbar", ""), "loop.yaml"))


def test_a_long_schema_error_prints_a_few_hundred_characters(tmp_path):
    path = _config(tmp_path, CONFIG.replace("\nname: agc_ttbar", f"\n{_bomb(4)}\nname: *x4"))  # 9^4 strings
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    text = str(info.value)
    assert "config name: [[[[['lol']" in text and "more characters)" in text
    assert max(len(line) for line in text.splitlines()) < 700  # before: 3.85 MB at 9^6


def test_duplicate_yaml_keys_are_refused_with_key_and_lines(tmp_path):
    path = _config(tmp_path, CONFIG + "\nname: other\n")
    with pytest.raises(ConfigError, match=r"config.yaml'?: duplicate key 'name' at line \d+ \(first at line 3\)"):
        load_spec(path)
    nested = CONFIG.replace("  jet_pt: Jet_pt", "  jet_pt: Jet_pt\n  jet_pt: Jet_ptRaw", 1)
    assert nested != CONFIG
    with pytest.raises(ConfigError, match=r"duplicate key 'jet_pt' at line"):
        load_spec(_config(tmp_path, nested, "nested.yaml"))
    # a merge key and a key that overrides what it merged are not duplicates
    merged = CONFIG.replace("\nname: agc_ttbar", "\n_base: &base {a: 1}\nname: agc_ttbar", 1)
    from jacana.stages.spec import load_yaml
    assert load_yaml("b: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", "t")["c"] == {"x": 3, "y": 2}
    assert "_base" in load_yaml(merged, "t")


def test_yaml_size_and_nesting_are_bounded(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "w") as f:
        f.write("name: x\n#" + " " * MAX_YAML_BYTES + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml' has [\d,]+ bytes; a config has at most"):
        load_spec(big)
    with pytest.raises(ConfigError, match="nested too deeply|not valid YAML"):
        load_spec(_config(tmp_path, "name: " + "[" * 5000 + "]" * 5000))
    with pytest.raises(ConfigError, match="does not exist as a regular file"):
        load_spec(tmp_path)


# -- params.json -----------------------------------------------------------------------------
def _nn(hidden=(3, 2)):
    from jacana.stages.observables.nn import init_weights, weights_to_json

    return weights_to_json(init_weights(hidden))


@pytest.mark.parametrize("content, message", [
    ({"params": {"edges_4j1b": [50, float("nan"), 300]}}, r"edges_4j1b\[1\] must be a finite number, got nan"),
    ({"params": {"edges_4j1b": [50, 200, 100, 550]}}, r"edges_4j1b must be strictly increasing; edge 2 \(100.0\)"),
    ({"params": {"jet_pt_min": float("inf")}}, r"jet_pt_min must be a finite number, got inf"),
    ({"params": {"jet_pt_min": True}}, r"jet_pt_min must be a finite number, got True"),
    ({"params": {"nn": {k: v for k, v in _nn().items() if k != "w1"}}}, r"nn lacks the weight array\(s\) \['w1'\]"),
    ({"params": {"nn": {**_nn(), "b1": [0.0]}}}, r"nn.b1 has shape \[1\], expected \[3\]"),
    ({"params": {"nn": {**_nn(), "w2": [[1, 2], [3]]}}}, r"nn.w2 must be a \(nested\) list of numbers of one shape"),
    ({"params": {"jet_pt_min": 30}, "overrides": ["tree=Other"]}, r"overrides\[0\] 'tree=Other' would change 'tree'"),
    ({"params": {"jet_pt_min": 30}, "overrides": ["branches.jet_pt=Jet_ptRaw"]}, r"would change 'branches.jet_pt'"),
    ({"params": {"jet_pt_min": 30}, "overrides": ["samples.ttbar.xsec_pb=1"]}, r"would change 'samples.ttbar"),
    ({"params": {"jet_pt_min": 30}, "overrides": [5]}, r"overrides\[0\] must be a 'key=value' string"),
    ({"params": {}}, r"must map parameter names to values"),
    ([], r"must map parameter names to values"),
])
def test_bad_params_files_name_the_file_and_the_key(tmp_path, content, message):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message) as info:
        load_params_file(path)
    assert str(path) in str(info.value)


def test_a_params_file_as_optimize_writes_it_is_accepted(tmp_path):
    path = tmp_path / "params.json"
    content = {"params": {"jet_pt_min": 27.5, "edges_4j1b": [110, 200, 550], "nn": _nn()},
               "overrides": ["regions.4j1b.observable=nn", "regions.4j1b.edges={low: 0.0, high: 1.0, bins: 10}"]}
    path.write_text(json.dumps(content))
    values, overrides = load_params_file(path)
    assert values["jet_pt_min"] == 27.5 and values["edges_4j1b"] == [110.0, 200.0, 550.0]
    assert overrides == content["overrides"]
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="deep.json' is nested too deeply"):
        load_params_file(tmp_path / "deep.json")


def test_evaluate_refuses_a_bad_params_file_before_reading_any_data(tmp_path, capsys):
    from jacana.cli.main import main

    (tmp_path / "params.json").write_text(json.dumps({"params": {"edges_4j1b": [50, float("nan"), 300]}}))
    t0 = time.perf_counter()
    code = main(["evaluate", "--params", str(tmp_path / "params.json"), "--fileset", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code != 0 and time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "params.json': edges_4j1b[1] must be a finite number" in err and "Traceback" not in err


# -- non-finite branches -------------------------------------------------------------------------
@pytest.mark.parametrize("branch", ["Jet_pt", "genWeight"])
def test_an_all_nan_branch_is_an_error_unless_masking_is_asked_for_then_a_warning(tmp_path, branch):
    """By default more than 1 % non-finite values of a branch is an error naming file, branch and count
    (the issue's all-NaN file changed sigma_mu from 0.21 to 0.50 with exit 0); --mask-non-finite masks
    them, with a warning per file and branch."""
    from test_inputs import nanoaod_like, write_file

    record = nanoaod_like(40, seed=1)
    if branch == "genWeight":
        record["genWeight"] = np.full(40, np.nan, np.float32)
    else:
        import awkward as ak

        jets = record["Jet"]
        record["Jet"] = ak.zip({**{k: jets[k] for k in jets.fields}, "pt": jets.pt * np.float32("nan")})
    path = write_file(tmp_path / "nan.root", record)
    from jacana.stages.fileset import Chunk

    chunk = Chunk("ttbar", "nominal", path, 0, 40, 40)
    n = 200 if branch == "Jet_pt" else 40
    with pytest.raises(InputFileError, match=rf"nan.root.*branch '{branch}' has {n} non-finite \(NaN/inf\) values of"
                                             rf" {n} \(100.0%; at most 1% are masked\).*--mask-non-finite"):
        read_chunk(chunk, SPEC)
    masking = SPEC.masking_nonfinite()
    report = InputReport()
    with pytest.warns(NonFiniteInputWarning, match=rf"nan.root: branch '{branch}' has {n} non-finite .*\(40 events\)"):
        report.columns_read(read_chunk(chunk, masking))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per file and branch: the second chunk only counts
        report.columns_read(read_chunk(chunk, masking))
    assert report.to_dict()["nonfinite_values_by_file"] == {path: {branch: 2 * n}}


# -- checkpoints -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as an optimisation writes it after step 0 (no step is run), and the digests of
    its inputs (a tiny fileset)."""
    from jacana.analysis.optimize import CHECKPOINT, OptimizeSettings, Optimizer, _as_jax, input_digests

    out = tmp_path_factory.mktemp("ckpt")
    fileset = parse_fileset({s: {v: {"files": [{"path": f"/d/{s}_{v}.root", "nevts": 10}]}
                                 for v in SPEC.file_variations(s)} for s in SPEC.samples}, source="train.json")
    settings = OptimizeSettings(steps=3)
    inputs = input_digests(SPEC, settings, fileset)
    opt = Optimizer(SPEC, None, settings, out, progress=False, inputs=inputs)
    params = SPEC.param_values()
    opt._save_checkpoint(0, params, opt.tx.init(_as_jax(params)), [{"step": 0}], math.inf, 0, 0.5)
    return {"raw": json.loads((out / CHECKPOINT).read_text()), "settings": settings, "inputs": inputs,
            "fileset": fileset}


def _read(tmp_path, raw, checkpoint, inputs=None, settings=None):
    from jacana.analysis.optimize import read_checkpoint

    path = tmp_path / "checkpoint.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return read_checkpoint(path, SPEC, settings or checkpoint["settings"], inputs or checkpoint["inputs"])


def _edit(raw, **changes):
    out = json.loads(json.dumps(raw))
    for key, value in changes.items():
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


def test_a_good_checkpoint_reads_back(checkpoint, tmp_path):
    state = _read(tmp_path, checkpoint["raw"], checkpoint)
    assert state["step"] == 0 and state["params"] == checkpoint["raw"]["params"]


@pytest.mark.parametrize("change, message", [
    (lambda c: [], r"is a JSON list, not the object jacana optimize writes"),
    (lambda c: _edit(c, settings=None), r"lacks 'settings'"),
    (lambda c: _edit(c, opt_state=c["opt_state"][:-1]), r"has \d+ optimiser-state arrays; these parameters need"),
    (lambda c: _edit(c, params={**c["params"], "jet_pt_min": float("nan")}), r"non-finite value in .*'jet_pt_min'"),
    (lambda c: _edit(c, params={**c["params"], "jet_pt_min": 1e9}), r"jet_pt_min = 1000000000.0, outside its bounds"),
    (lambda c: _edit(c, params={**c["params"], "bogus": 1.0}), r"unknown parameter 'bogus'"),
    (lambda c: _edit(c, step="1"), r"'step' of type str, expected int"),
    (lambda c: _edit(c, step=4), r"1 history entries for step 4"),
    (lambda c: _edit(c, best=float("nan")), r"'best' = nan"),
])
def test_damaged_checkpoints_are_refused_naming_the_file(checkpoint, tmp_path, change, message):
    from jacana.analysis.optimize import OptimizationError

    with pytest.raises(OptimizationError, match=message) as info:
        _read(tmp_path, change(checkpoint["raw"]), checkpoint)
    assert str(tmp_path / "checkpoint.json") in str(info.value)


def test_resume_with_other_inputs_says_what_differs(checkpoint, tmp_path):
    from jacana.analysis.optimize import OptimizationError, OptimizeSettings, input_digests

    other = parse_fileset({**checkpoint["fileset"].to_dict(),
                           "wjets": {"nominal": {"files": [{"path": "/d/w.root", "nevts": 11}]}}}, source="other.json")
    with pytest.raises(OptimizationError, match=r"a different fileset \(then train.json, now other.json"):
        _read(tmp_path, checkpoint["raw"], checkpoint, inputs=input_digests(SPEC, checkpoint["settings"], other))
    settings = OptimizeSettings(steps=3, objective="z0")
    with pytest.raises(OptimizationError, match=r"different settings \(objective\)"):
        _read(tmp_path, checkpoint["raw"], checkpoint, settings=settings)
    more = OptimizeSettings(steps=10)  # a resume may run more steps
    assert _read(tmp_path, checkpoint["raw"], checkpoint, settings=more)["step"] == 0
    with pytest.warns(UserWarning, match="predates input digests"):  # a checkpoint of an older jacana
        _read(tmp_path, _edit(checkpoint["raw"], inputs=None), checkpoint)


def test_run_optimize_refuses_a_bad_checkpoint_before_reading_events(checkpoint, tmp_path):
    from jacana.analysis.optimize import OptimizationError, run_optimize

    (tmp_path / "checkpoint.json").write_text(json.dumps(_edit(checkpoint["raw"], opt_state=[])))
    fileset = checkpoint["fileset"]  # its files do not exist: reading any would be an InputFileError
    with pytest.raises(OptimizationError, match="optimiser-state arrays"):
        run_optimize(SPEC, fileset, fileset, tmp_path, checkpoint["settings"], resume=True, progress=False)
