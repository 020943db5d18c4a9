"""What the command line alone decides is refused at once, before any data is read (issue 24, item 3)."""

from __future__ import annotations

import time

import pytest

from jacana.cli.main import main


def _refused(argv, capsys) -> str:
    t = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert time.perf_counter() - t < 5.0  # refused before reading or generating anything
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["optimize", "--steps", "-1", "--out", "x"], "expected a number >= 1, got -1"),
    (["optimize", "--steps", "abc", "--out", "x"], "expected a whole number, got 'abc'"),
    (["generate", "--events", "-5", "--out", "x"], "expected a number >= 1, got -5"),
    (["optimize", "--stpes", "5", "--out", "x"], "--stpes (did you mean --steps?)"),
])
def test_bad_values_and_typos_are_refused_at_once(argv, message, capsys):
    assert message in _refused(argv, capsys)


def test_an_output_path_that_is_a_file_is_refused_at_once(tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("not a folder")
    assert "an existing file, not a folder" in _refused(["evaluate", "--out", str(f)], capsys)


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    assert "no checkpoint to resume" in _refused(["optimize", "--resume", "--out", str(tmp_path)], capsys)


def test_an_invalid_override_is_named_not_the_shipped_file(capsys):
    from jacana.stages.errors import ConfigError
    from jacana.stages.spec import load_spec

    with pytest.raises(ConfigError, match=r"caused by the override\(s\) jet_pt_min=abc"):
        load_spec(overrides=["jet_pt_min=abc"])


def test_generate_with_too_few_events_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--events", "5", "--out", str(tmp_path / "g"), "--quiet"]) in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("jacana 0.")


def test_available_samples_leaves_out_what_the_fileset_lacks_and_says_so():
    """--available-samples: one's own files rarely hold every sample and variation of a config."""
    from jacana.facility.hardrun import analysis_chunks, restricted_to
    from jacana.stages.errors import FilesetError
    from jacana.stages.fileset import parse_fileset
    from jacana.stages.spec import load_spec

    spec = load_spec()
    files = lambda n: {"files": [{"path": f"/data/{n}.root", "nevts": 1000}]}  # noqa: E731
    fileset = parse_fileset({"ttbar": {"nominal": files("tt"), "ME_var": files("me")},
                             "wjets": {"nominal": files("w")}})
    with pytest.raises(FilesetError, match="lacks what the analysis needs"):
        analysis_chunks(spec, fileset)
    small, dropped = restricted_to(spec, fileset)
    assert list(small.samples) == ["ttbar", "wjets"]
    assert "systematic ttbar_me (no files of ttbar/ME_var)" not in dropped  # ME_var is there: kept
    assert "systematic ttbar_ps (no files of ttbar/PS_var)" in dropped
    assert "sample single_top_tW (no nominal files)" in dropped
    assert small.raw["pseudo_data"]["ttbar"] == ["ME_var"]
    assert {"ttbar_me", "wjets_norm", "lumi", "jes"} <= set(small.raw["systematics"])
    assert len(analysis_chunks(small, fileset)) == 3  # ttbar nominal + ME_var, wjets nominal
    assert restricted_to(small, fileset) == (small, [])  # nothing more to leave out
    with pytest.raises(FilesetError, match="sample of the parameter of interest"):
        restricted_to(spec, parse_fileset({"wjets": {"nominal": files("w")}}))
