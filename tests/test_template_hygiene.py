"""Template hygiene of the statistical model (issue 22 item 1) and the pull/impact plots (item 6).

Hand-made histograms in jacana's layout for the AGC config (no events read): symmetrisation as
configured and listed, pruning of a negligible systematic (listed, identical in hard and soft mode),
smoothing of a noisy variation, and cabinetry's fit and ranking on a small jacana workspace.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jacana.stages.errors import ConfigError
from jacana.stages.spec import DEFAULT_PRUNING, NOMINAL, AnalysisSpec, config_schema, load_spec
from jacana.stages.stats.workspace import (
    build_channels,
    build_workspace,
    channels_to_yields,
    pruning_decisions,
    roughness,
    smooth_ratio,
    smoothed_variation,
    template_hygiene,
)

SCALES = {"ttbar": 1000.0, "single_top_s_chan": 20.0, "single_top_t_chan": 60.0, "single_top_tW": 80.0,
          "wjets": 300.0}


def make_hists(spec: AnalysisSpec, negligible: tuple[str, str] | None = None, seed: int = 3) -> dict:
    """Smooth histograms with a few-percent effect per variation; ``negligible = (sample, variation)``
    gets a 1e-5 effect instead (below the default pruning thresholds)."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    for region, r in spec.regions.items():
        n = len(r.edges) - 1
        x = np.linspace(-1.0, 1.0, n)
        for sample in spec.samples:
            nominal = SCALES[sample] * np.exp(-x ** 2) * (1.0 + 0.1 * (region == "4j2b"))
            by_v = {}
            for v in spec.histogram_variations(sample):
                if v == NOMINAL:
                    values = nominal
                elif (sample, v) == negligible:
                    values = nominal * (1.0 + 1e-5 * x)
                else:
                    sign = -1.0 if v.endswith("down") else 1.0
                    values = nominal * (1.0 + sign * (0.02 + 0.03 * x * rng.uniform(0.5, 1.0)))
                by_v[v] = {"edges": np.asarray(r.edges), "sumw": np.asarray(values, np.float64),
                           "sumw2": np.asarray(values, np.float64) / 50.0}
            out.setdefault(region, {})[sample] = by_v
    return out


def spec_with(hygiene: dict | None = None, keep: tuple[str, ...] | None = None,
              regions: tuple[str, ...] | None = None) -> AnalysisSpec:
    """The AGC spec with a ``hygiene:`` block and (``keep``, ``regions``) only some systematics and regions
    (smaller models compile and fit faster)."""
    raw = load_spec().to_dict()
    if keep is not None:
        raw["systematics"] = {k: v for k, v in raw["systematics"].items() if k in keep}
    if regions is not None:
        raw["regions"] = {k: v for k, v in raw["regions"].items() if k in regions}
    if hygiene is not None:
        raw["hygiene"] = hygiene
    return AnalysisSpec(raw)


def without_staterror(ws: dict) -> dict:
    """The workspace without its staterror modifiers (a valid pyhf workspace with fewer parameters: fast fits)."""
    for ch in ws["channels"]:
        for sample in ch["samples"]:
            sample["modifiers"] = [m for m in sample["modifiers"] if m["type"] != "staterror"]
    return ws


def modifiers_of(channels: list, region: str, sample: str) -> list[tuple[str, str]]:
    ch = next(c for c in channels if c["name"] == region)
    return [(m["name"], m["type"]) for m in next(s for s in ch["samples"] if s["name"] == sample)["modifiers"]]


def test_schema_defaults_match_the_builder():
    for general in (False, True):
        pruning = config_schema(general)["properties"]["hygiene"]["properties"]["pruning"]["properties"]
        assert {k: v["default"] for k, v in pruning.items()} == DEFAULT_PRUNING


def test_one_sided_variation_is_symmetrised_as_configured_and_listed():
    spec = load_spec()
    hists = make_hists(spec)
    listed = {e["modifier"]: e for e in template_hygiene(spec, hists)["symmetrized"]}
    # the AGC's one-sided variations are mirrored by default (auto), and say so
    assert listed["ttbar_ps"] == {"modifier": "ttbar_ps", "samples": ["ttbar"], "mode": "one_sided", "one_sided": True}
    assert "ttbar_scale" not in listed  # two-sided: kept as it is
    ws = build_workspace(spec, hists)
    ttbar = next(s for s in ws["channels"][0]["samples"] if s["name"] == "ttbar")
    ps = next(m for m in ttbar["modifiers"] if m["name"] == "ttbar_ps" and m["type"] == "histosys")["data"]
    nominal = np.asarray(ttbar["data"])
    np.testing.assert_allclose(np.asarray(ps["lo_data"]), 2 * nominal - np.asarray(ps["hi_data"]), rtol=1e-12)

    # explicitly: a two-sided variation mirrored from its up template, or averaged (TRExFitter's TWOSIDED)
    for mode in ("one_sided", "two_sided"):
        s = spec_with({"symmetrize": {"ttbar_scale": mode}})
        entry = {e["modifier"]: e for e in template_hygiene(s, hists)["symmetrized"]}["ttbar_scale"]
        assert entry["mode"] == mode and entry["one_sided"] is False
        data = {m["type"]: m["data"] for m in next(x for x in build_workspace(s, hists)["channels"][0]["samples"]
                                                   if x["name"] == "ttbar")["modifiers"] if m["name"] == "ttbar_scale"}
        hi, lo = np.asarray(data["histosys"]["hi_data"]), np.asarray(data["histosys"]["lo_data"])
        norm = data["normsys"]
        assert norm["hi"] + norm["lo"] == pytest.approx(2.0, rel=1e-12)
        if mode == "one_sided":  # mirrored after the norm/shape split, as cabinetry does
            np.testing.assert_allclose(lo + hi, 2 * nominal, rtol=1e-9)
        else:  # the variations themselves (norm times shape) are symmetric about the nominal
            np.testing.assert_allclose(norm["hi"] * hi + norm["lo"] * lo, 2 * nominal, rtol=1e-9)
    # a one-sided variation cannot be averaged or kept without a down template: an error at load
    with pytest.raises(ConfigError, match="ttbar_ps.*needs a down variation"):
        spec_with({"symmetrize": {"ttbar_ps": "two_sided"}})
    with pytest.raises(ConfigError, match="not a shape systematic"):
        spec_with({"smoothing": {"no_such": "353H"}})


def test_negligible_systematic_is_pruned_and_listed():
    spec = load_spec()
    hists = make_hists(spec, negligible=("wjets", "pt_res_up"))
    pruned = template_hygiene(spec, hists)["pruned"]
    wjets_jer = {(p["region"], p["type"]) for p in pruned if p["sample"] == "wjets" and p["modifier"] == "jer"}
    assert wjets_jer == {(r, t) for r in spec.regions for t in ("normsys", "histosys")}
    assert all(p["effect"] < p["threshold"] for p in pruned)
    assert all(p["modifier"] == "jer" and p["sample"] == "wjets" for p in pruned)  # nothing else is negligible
    channels = build_channels(spec, hists)
    assert not any(name == "jer" for name, _ in modifiers_of(channels, "4j2b", "wjets"))
    assert ("jer", "histosys") in modifiers_of(channels, "4j2b", "ttbar")
    # thresholds 0 keep everything; --set reaches the optional block
    off = load_spec(overrides=["hygiene.pruning.norm=0", "hygiene.pruning.shape=0"])
    assert not template_hygiene(off, hists)["pruned"]
    assert ("jer", "normsys") in modifiers_of(build_channels(off, hists), "4j2b", "wjets")


def test_pruning_is_identical_in_hard_and_soft_mode():
    """The decision is taken from concrete templates and passed to the traced build: same modifiers and
    numbers, finite gradients; without the decision a traced build is a clear error."""
    spec = spec_with(keep=("jer",), regions=("4j2b",))
    hists = make_hists(spec, negligible=("wjets", "pt_res_up"))
    pruned = pruning_decisions(spec, hists)
    hard = channels_to_yields(build_channels(spec, hists))

    def soft(scale):
        scaled = jax.tree.map(lambda a: a * scale, hists)
        return channels_to_yields(build_channels(spec, scaled, xp=jnp, pruned=pruned))

    def total(scale):  # one compiled function: the traced model's numbers and a gradient through them
        values = soft(scale)
        return sum(jnp.sum(v) for v in jax.tree.leaves(values)), values

    (_, values), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.float64(1.0))
    assert jax.tree.structure(values) == jax.tree.structure(hard)
    assert "jer" not in values["4j2b"]["wjets"]["modifiers"] and "jer" in values["4j2b"]["ttbar"]["modifiers"]
    for a, b in zip(jax.tree.leaves(values), jax.tree.leaves(hard)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)
    assert np.isfinite(grad)
    with pytest.raises(ConfigError, match="pruning decision needs concrete templates"):
        jax.grad(lambda s: jnp.sum(build_channels(spec, jax.tree.map(lambda a: a * s, hists), xp=jnp)[0]["samples"][0]
                                   ["data"]))(1.0)


def test_soft_likelihood_gets_the_same_modifiers():
    """The objective's traced model is built with the hard pruning and accepts its own soft yields."""
    from jacana.stages.analysis import soft_config
    from jacana.stages.stats.sensitivity import Sensitivity, yields_key

    spec = spec_with(keep=("jer",), regions=("4j2b",))
    config = soft_config(spec)
    hists = make_hists(spec, negligible=("wjets", "pt_res_up"))
    template = {}
    for sample in spec.samples:
        for file_var in spec.file_variations(sample):
            names = config.variations(True) if file_var == NOMINAL else (file_var,)
            template[yields_key(sample, file_var)] = {
                r: {k: np.stack([hists[r][sample][v][k] for v in names]) for k in ("sumw", "sumw2")}
                for r in spec.regions}
    objective = Sensitivity(spec, config, template)
    assert objective.pruned == pruning_decisions(spec, hists)
    model = objective.model.pyhf_model
    wjets = {m for m, t in model.config.modifiers if m == "jer"}
    assert wjets == {"jer"}  # jer stays a parameter (other samples carry it)
    soft = objective.model.check_yields(objective.model_yields(jax.tree.map(jnp.asarray, template)))
    assert "jer" not in soft["4j2b"]["wjets"]["modifiers"]


# (input, ROOT 6.40's TH1::SmoothArray(n, x, 1) of it), printed with repr: short arrays, ties from
# rounding, a plateau, a monotone array and one with negative bins (then ROOT does not floor at 0)
ROOT_SMOOTHED = [
    ([1.0, 1.2, 0.9],
     [1.0, 1.0, 1.0]),
    ([0.97, 1.04, 1.04, 0.99],
     [1.04, 1.04, 1.04, 1.04]),
    ([1.0324, 1.0235, 0.9678, 0.9411, 0.9928],
     [1.0324, 1.00831875, 0.97128125, 0.9538749999999999, 0.9538749999999999]),
    ([1.02, 0.98, 0.98, 0.98, 1.05, 1.01, 1.01],
     [0.98, 0.98, 0.98, 0.9875, 1.0025, 1.01, 1.01]),
    ([1.06, 1.07, 1.05, 1.02, 1.08, 1.06, 0.99, 0.95, 0.98, 0.98, 1.03],
     [1.06, 1.06, 1.06, 1.0550000000000002, 1.045, 1.0275, 1.0, 0.9825, 0.98, 0.98, 0.98]),
    ([0.8, 0.85, 0.9, 0.93, 0.97, 1.0, 1.02, 1.05, 1.1, 1.12, 1.2],
     [0.8, 0.85, 0.8959375, 0.9355208333333334, 0.9713541666666666, 0.9986458333333332, 1.0189583333333332,
      1.049791666666667, 1.0914583333333334, 1.13625, 1.1925000000000001]),
    ([0.91, 0.99, 1.08, 0.95, 0.96, 1.0, 0.93, 0.99, 1.0, 1.0, 0.95, 0.98, 1.03, 0.96, 1.03, 1.03, 0.93, 0.97,
      1.03, 1.02, 1.01, 0.98, 1.01, 1.09, 0.99],
     [0.99, 0.99, 0.98375, 0.9687499999999999, 0.96, 0.9700000000000001, 0.9874999999999999, 0.99625, 0.99875,
      0.9974999999999999, 0.9922222222222222, 0.991111111111111, 0.9988888888888888, 1.0150000000000001, 1.03,
      1.0266666666666668, 1.0108333333333333, 1.0050000000000001, 1.0083333333333333, 1.01, 1.01, 1.01, 1.01,
      1.01, 1.01]),
    ([0.058, -0.042, -0.02, 0.065, -0.093, -0.024, -0.061, -0.086, 0.018, 0.124, 0.022, -0.038, -0.145, 0.082,
      0.021, -0.063, 0.086, 0.157, -0.163, 0.059, 0.085, 0.058, 0.16, 0.063, -0.09],
     [-0.019999999999999997, -0.02, -0.02, -0.015520833333333334, -0.018413194444444454, -0.04089930555555557,
      -0.053954861111111106, -0.02682291666666667, 0.018, 0.033625, 0.025312499999999998, 0.0210625, 0.021,
      0.021, 0.021, 0.0305, 0.049499999999999995, 0.059, 0.059, 0.059, 0.06, 0.062, 0.063, 0.063, 0.063]),
]


@pytest.mark.parametrize("values, root", ROOT_SMOOTHED)
def test_353h_is_root_smooth(values, root):
    """``smooth_ratio(x, "353H")`` is ROOT's ``TH1::Smooth()`` (353QH twice, with its end rules and the
    quadratic interpolation of plateaus), in numpy and in jax, also under jit."""
    x = np.asarray(values)
    np.testing.assert_allclose(smooth_ratio(x, "353H"), root, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(smooth_ratio(jnp.asarray(x), "353H", jnp)), root, rtol=0, atol=1e-12)
    jitted = jax.jit(lambda v: smooth_ratio(v, "353H", jnp))
    np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(x))), root, rtol=0, atol=1e-12)


def test_smoothing_short_arrays_unchanged():
    """ROOT refuses fewer than 3 bins; they are returned as they are."""
    for x in (np.array([1.2]), np.array([0.9, 1.3])):
        for method in ("353H", "median3"):
            np.testing.assert_array_equal(smooth_ratio(x, method), x)


def test_353h_gradient():
    """The soft-mode gradient of ``353H`` is the derivative of the formulas the medians and tests pick:
    central differences agree at an array whose first pass interpolates a plateau; with ties (rounded
    values, where the smoother has no derivative) it stays finite."""
    from jacana.stages.stats.workspace import _353, _quadratic_plateaus

    rng = np.random.default_rng(11)
    x, weights = 1.0 + 0.05 * rng.standard_normal(25), rng.standard_normal(25)
    assert np.any(_quadratic_plateaus(_353(x, np), np) != _353(x, np))

    def f(v, xp=np):
        return xp.sum(weights * smooth_ratio(v, "353H", xp))

    grad = jax.jit(jax.grad(lambda v: f(v, jnp)))
    h = 1e-7
    central = [(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(x.size)]
    np.testing.assert_allclose(np.asarray(grad(jnp.asarray(x))), central, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad(jnp.asarray(np.round(x, 2))))))


def test_smoothing_reduces_bin_to_bin_fluctuation():
    rng = np.random.default_rng(5)
    x = np.linspace(-1, 1, 25)
    nominal = 1000.0 * np.exp(-x ** 2)
    noisy = nominal * (1.0 + 0.05 * x + 0.04 * rng.standard_normal(x.size))
    for method in ("353H", "median3"):
        smoothed = smoothed_variation(nominal, noisy, method)
        assert roughness(nominal, smoothed) < 0.6 * roughness(nominal, noisy)
        assert np.sum(smoothed) == pytest.approx(np.sum(noisy), rel=1e-12)  # only the shape is smoothed
    # the same in soft mode, and differentiable
    def soft(v):
        out = smoothed_variation(jnp.asarray(nominal), v, "353H", jnp)
        return jnp.sum(out ** 2), out

    (_, out), g = jax.jit(jax.value_and_grad(soft, has_aux=True))(jnp.asarray(noisy))
    np.testing.assert_allclose(np.asarray(out), smoothed_variation(nominal, noisy, "353H"), rtol=1e-12)
    assert np.all(np.isfinite(np.asarray(g)))
    spec = spec_with({"smoothing": {"jes": "353H"}}, keep=("jes",))
    hists = make_hists(spec)
    hists["4j2b"]["ttbar"]["pt_scale_up"]["sumw"] = hists["4j2b"]["ttbar"][NOMINAL]["sumw"] * (
        1.0 + 0.03 + 0.05 * rng.standard_normal(len(spec.regions["4j2b"].edges) - 1))
    entry = next(e for e in template_hygiene(spec, hists)["smoothed"]
                 if e["region"] == "4j2b" and e["sample"] == "ttbar")
    assert entry["method"] == "353H" and entry["roughness_after"] < entry["roughness_before"]


def test_cabinetry_fit_and_ranking_on_a_jacana_workspace(tmp_path):
    """cabinetry's fit and ranking on a small jacana workspace (three systematics; staterror left out so
    that cabinetry.fit.ranking ranks only them): valid minima (cabinetry raises FailedMinimization
    otherwise), and pulls_and_ranking's impacts equal cabinetry.fit.ranking's; the plots are written."""
    cabinetry = pytest.importorskip("cabinetry")
    from jacana.analysis.plots import pulls_and_ranking

    spec = spec_with(keep=("jes", "lumi", "ttbar_ps"))
    ws = without_staterror(build_workspace(spec, make_hists(spec)))
    model, data = cabinetry.model_utils.model_and_data(ws)
    fit = cabinetry.fit.fit(model, data)
    ranking = cabinetry.fit.ranking(model, data, fit_results=fit)
    assert np.all(np.isfinite(fit.uncertainty)) and np.all(np.isfinite(ranking.postfit_up))
    made = pulls_and_ranking(ws, tmp_path)
    assert made["source"] == "cabinetry", made["why"]
    ours = {i["name"]: i for i in made["impacts"]}
    assert set(ours) == set(ranking.labels) == {"jes", "lumi", "ttbar_ps"}
    sigma = fit.uncertainty[fit.labels.index("ttbar_norm")]
    for k, name in enumerate(ranking.labels):  # refits started elsewhere: equal within MINUIT's tolerance
        for key in ("prefit_up", "prefit_down", "postfit_up", "postfit_down"):
            assert ours[name][key] == pytest.approx(getattr(ranking, key)[k], abs=0.01 * sigma)
    assert made["poi_fit"]["value"] == pytest.approx(fit.bestfit[fit.labels.index("ttbar_norm")], rel=1e-6)
    assert {p["name"] for p in made["pulls"]} == {"jes", "lumi", "ttbar_ps"}
    assert all((tmp_path / f).stat().st_size > 0 for f in ("pulls.png", "ranking.png", "impacts.json"))
    assert json.loads((tmp_path / "impacts.json").read_text())["source"] == "cabinetry"


@pytest.mark.slow  # about 1 s: the fallback's own fits
def test_impacts_fall_back_to_jacana_when_cabinetry_fails(tmp_path, monkeypatch):
    """A failed cabinetry fit: jacana's own post-fit impacts (Asimov), the reason recorded, the plots made."""
    cabinetry = pytest.importorskip("cabinetry")
    from jacana.analysis.plots import pulls_and_ranking

    from pyhf.exceptions import FailedMinimization

    def failing(*args, **kwargs):
        raise FailedMinimization(type("Result", (), {"message": "FunctionMinimum is invalid"})())  # cabinetry's

    monkeypatch.setattr(cabinetry.fit, "fit", failing)
    spec = spec_with(keep=("lumi", "ttbar_ps"))
    ws = without_staterror(build_workspace(spec, make_hists(spec)))
    made = pulls_and_ranking(ws, tmp_path)
    assert made["source"] == "jacana" and "FailedMinimization" in made["why"]
    assert {i["name"] for i in made["impacts"]} == {"lumi", "ttbar_ps"}
    assert all(np.isfinite(i["postfit_up"]) and i["prefit_up"] is None for i in made["impacts"])
    assert (tmp_path / "ranking.png").stat().st_size > 0


@pytest.mark.slow
def test_pulls_and_impacts_on_a_100k_evaluation(tmp_path):
    """On a real ``jacana evaluate`` output of 100k synthetic events: the plots are made, by cabinetry
    where its fits succeed, else by jacana's impacts with the reason recorded."""
    from jacana.cli.main import main
    from jacana.samples.synthetic import generate

    fileset = generate(tmp_path / "s", events=100_000, seed=7, progress=False)
    out = tmp_path / "out"
    assert main(["evaluate", "--fileset", str(fileset), "--out", str(out), "--quiet", "--impacts"]) == 0
    made = json.loads((out / "plots" / "impacts.json").read_text())
    assert made["source"] in ("cabinetry", "jacana")
    assert made["source"] == "cabinetry" or made["why"]
    assert any(i["postfit_up"] is not None for i in made["impacts"])
    result = json.loads((out / "result.json").read_text())
    assert {"pruned", "symmetrized", "smoothed", "settings"} <= set(result["template_hygiene"])


def test_a_refit_that_migrad_leaves_invalid_is_retried_at_strategy_2_and_named():
    """On the main job's 1M workspace one impact refit (btag_0 pre-fit up) ends above MIGRAD's EDM
    limit at strategy 1 and converges at 2 (jacana evaluate --impacts then stays with cabinetry)."""
    import pyhf

    from jacana.analysis.plots import _fit_with_retry

    class FakeCabinetry:
        class fit:
            calls = []

            @staticmethod
            def fit(model, data, init_pars=None, fix_pars=None, strategy=None):
                FakeCabinetry.fit.calls.append(strategy)
                if strategy != 2:
                    raise pyhf.exceptions.FailedMinimization(type("R", (), {"message": "EDM above max"})())
                return "result"

    retried = []
    assert _fit_with_retry(FakeCabinetry, None, None, [0.0], [False], retried, "btag_0 prefit up") == "result"
    assert retried == ["btag_0 prefit up"] and FakeCabinetry.fit.calls == [None, 2]


def test_impacts_stop_a_gammas_shift_at_its_bound(tmp_path):
    """A bin whose MC-statistical uncertainty exceeds its content (150 %): its gamma's pre-fit down shift
    (1 - 1.5 < 0) would leave the gamma's bounds, which pyhf refuses (cabinetry 0.6 raises there); jacana's
    impacts stop it at the bound, name it, and the refit is valid."""
    pytest.importorskip("cabinetry")
    from jacana.analysis.plots import pulls_and_ranking

    spec = spec_with(keep=("lumi",))
    hists = make_hists(spec)
    for sample in spec.samples:
        h = hists["4j2b"][sample][NOMINAL]
        h["sumw2"] = np.array(h["sumw2"])
        h["sumw2"][0] = (1.5 * h["sumw"][0]) ** 2
    made = pulls_and_ranking(build_workspace(spec, hists), tmp_path, staterror=True)
    assert made["source"] == "cabinetry", made["why"]
    assert [c.split(":")[0] for c in made["clipped_at_bounds"]] == ["staterror_4j2b[0] prefit down"]
    row = next(i for i in made["impacts"] if i["name"] == "staterror_4j2b[0]")
    assert all(np.isfinite(row[k]) for k in ("prefit_up", "prefit_down", "postfit_up", "postfit_down"))


def test_a_failed_refit_leaves_only_its_impact_unknown(tmp_path, monkeypatch):
    """One refit MINUIT cannot finish (at strategy 1 nor 2): its impact is None and named, the others stay
    cabinetry's, and the ranking plot is drawn without it."""
    cabinetry = pytest.importorskip("cabinetry")
    from pyhf.exceptions import FailedMinimization

    from jacana.analysis.plots import pulls_and_ranking

    spec = spec_with(keep=("jes", "lumi", "ttbar_ps"))
    ws = without_staterror(build_workspace(spec, make_hists(spec)))
    real_fit = cabinetry.fit.fit
    calls = []

    def failing_for_lumi_up(model, data, init_pars=None, fix_pars=None, **kwargs):
        i = model.config.par_names.index("lumi")
        if fix_pars is not None and fix_pars[i] and init_pars[i] > 0.5:
            calls.append(kwargs.get("strategy"))
            if len(calls) <= 2:  # the first such refit (pre-fit +1 sigma) and its strategy-2 retry
                raise FailedMinimization(type("Result", (), {"message": "Call limit was reached."})())
        return real_fit(model, data, init_pars=init_pars, fix_pars=fix_pars, **kwargs)

    monkeypatch.setattr(cabinetry.fit, "fit", failing_for_lumi_up)
    made = pulls_and_ranking(ws, tmp_path)
    assert made["source"] == "cabinetry" and made["why"] is None
    assert [f.split(":")[0] for f in made["failed_refits"]] == ["lumi prefit up"]
    assert made["strategy_2"] == ["lumi prefit up"] and calls[:2] == [None, 2]  # retried once at strategy 2
    rows = {r["name"]: r for r in made["impacts"]}
    assert rows["lumi"]["prefit_up"] is None and np.isfinite(rows["lumi"]["prefit_down"])
    assert all(np.isfinite(rows[n][k]) for n in ("jes", "ttbar_ps")
               for k in ("prefit_up", "prefit_down", "postfit_up", "postfit_down"))
    assert (tmp_path / "ranking.png").stat().st_size > 0
