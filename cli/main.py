"""The ``jacana`` command line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import jacana
from jacana.stages.errors import ConfigError, JacanaError
from jacana.stages.shapes import BATCH_DTYPES


def _add_analysis_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fileset", help="AGC-style fileset JSON (default: the embedded synthetic samples)")
    p.add_argument("--config", help="analysis config YAML (default: the embedded AGC ttbar config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter or config entry, e.g. jet_pt_min=25 or branches.jet_btag=Jet_btagDeepFlavB")
    p.add_argument("--events", type=_positive_int, default=None,
                   help="events of the embedded synthetic samples (default: 1,000,000 to evaluate and validate on,"
                        " 250,000 to optimise on)")
    p.add_argument("--available-samples", action="store_true",
                   help="run with the samples and alternative-sample systematics the fileset has; the others are"
                        " left out and listed (default: a missing one is an error)")
    p.add_argument("--mask-non-finite", action="store_true",
                   help="mask every NaN/inf input value (the object fails every cut, a bad weight becomes 0);"
                        " by default more than 1%% of a branch's values in a chunk is an error naming the file")
    p.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail",
                   help="a missing or unreadable input file stops the run (fail, default) or is skipped and"
                        " recorded in result.json (skip; nothing is re-weighted)")


def _spec_from_args(args):
    from jacana.stages.spec import load_spec

    spec = load_spec(args.config, overrides=args.overrides)
    return spec.masking_nonfinite() if getattr(args, "mask_non_finite", False) else spec


def _fileset_from_args(args, role: str, spec):
    from jacana.samples.datasets import DEFAULT_EVENTS, default_fileset
    from jacana.stages.fileset import load_fileset

    path = args.fileset or default_fileset(role, events=args.events or DEFAULT_EVENTS, **synthetic_preset(spec))
    return load_fileset(path)


def preset_names() -> list[str]:
    from jacana.samples.synthetic import PRESETS

    return sorted(PRESETS)


def objective_names() -> list[str]:
    """The objectives the CLI offers: the registry's (:data:`jacana.stages.stats.objectives.OBJECTIVES`)."""
    from jacana.stages.stats.objectives import OBJECTIVES

    return sorted(OBJECTIVES)


def synthetic_preset(spec) -> dict:
    """The embedded synthetic samples an analysis runs on by default: its config's ``synthetic`` preset
    (default "agc"), regenerated if cached before the MET branches existed and the analysis reads them."""
    return {"preset": spec.raw.get("synthetic", "agc"),
            "require_met": any(b.startswith("MET_") for b in spec.needed_branches())}


def _fit_to_filesets(args, spec, *filesets):
    """The analysis to run on ``filesets``: with ``--available-samples``, only what every one of them
    has (what is left out is printed); and a warning where the config can select events the synthetic
    samples' skim never wrote."""
    from jacana.facility.hardrun import restricted_to
    from jacana.samples.synthetic import skim_conflicts

    if getattr(args, "available_samples", False):
        spec, left_out = restricted_to(spec, *filesets)
        for line in left_out:
            print(f"jacana: left out (--available-samples): {line}", file=sys.stderr)
    for line in dict.fromkeys(x for f in filesets for x in skim_conflicts(spec, f)):
        print(f"jacana: WARNING: {line}; results for such cuts miss those events", file=sys.stderr)
    return spec


def cmd_generate(args) -> int:
    from jacana.samples.synthetic import generate

    try:
        path = generate(args.out, events=args.events, seed=args.seed, progress=not args.quiet, preset=args.preset)
    except ValueError as exc:  # e.g. too few events for one per (sample, variation) file
        raise ConfigError(f"jacana generate: {exc}") from None
    print(f"jacana: wrote synthetic AGC samples; fileset: {path}")
    return 0


def cmd_evaluate(args) -> int:
    from jacana import evaluate
    from jacana.analysis.evaluate import load_params_file

    spec = _spec_from_args(args)
    if args.params:
        values, overrides = load_params_file(args.params)
        spec = spec.with_overrides(overrides).with_params(values)
    fileset = _fileset_from_args(args, "validate", spec)
    spec = _fit_to_filesets(args, spec, fileset)
    evaluation = evaluate(spec, fileset, progress=not args.quiet, on_bad_file=args.on_bad_file)
    paths = evaluation.write(args.out)
    print(f"jacana evaluate: {spec.name} on {fileset.source}")
    print(evaluation.summary())
    for skipped in evaluation.fit["inputs"]["skipped_files"]:
        print(f"  WARNING: skipped {skipped['path']}: {skipped['error']}")
    print(f"jacana: results in {Path(args.out).resolve()} ({', '.join(p.name for p in paths.values())})")
    if not args.no_plots:
        import warnings

        plot_dir = Path(args.out).resolve() / "plots"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            made = evaluation.plot(plot_dir)
        for w in caught:
            if "post-fit" in str(w.message):  # no post-fit plots, or what MINUIT printed, in one line
                print(f"  WARNING: {w.message}")
        print(f"jacana: data/MC plots (pre- and post-fit, per region) in {plot_dir}: {len(made)} files")
        if args.impacts:  # one refit pair per nuisance parameter: asked for, not default
            from jacana.analysis.plots import pulls_and_ranking

            ranked = pulls_and_ranking(evaluation.workspace, plot_dir)
            notes = [ranked["why"]] if ranked["why"] else []
            notes += [f"refit failed, its impact left out: {f}" for f in ranked.get("failed_refits", [])]
            print(f"jacana: pulls and impacts ({ranked['source']}) in {plot_dir}: pulls.png, ranking.png, impacts.json"
                  + "".join(f"\n  WARNING: {n}" for n in notes))
    return 0


def _int_at_least(minimum: int):
    """argparse type: a whole number >= ``minimum`` (checked before any data is read)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _in_unit_interval(text: str, expected: str) -> float:
    """``text`` as a number in (0, 1], or an argparse error that says what was ``expected``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _step_fraction(text: str) -> float | None:
    return None if text == "config" else _in_unit_interval(text, "a fraction in (0, 1] or 'config'")


def _relax_end(text: str) -> float:
    return _in_unit_interval(text, "a scale in (0, 1] (the relaxation starts at 1)")


def cmd_optimize(args) -> int:
    from jacana import optimize
    from jacana.analysis.optimize import OptimizeSettings, free_params
    from jacana.samples.datasets import DEFAULT_EVENTS, DEFAULT_TRAIN_EVENTS, default_fileset
    from jacana.stages.fileset import load_fileset

    from jacana.analysis.chain import parse_remote

    spec = _spec_from_args(args)
    free = free_params(spec, args.free) if args.free is not None else None  # bad names fail before any data
    remote = parse_remote(args.remote_stage)  # checked before any data is read
    if args.fileset:
        train = load_fileset(args.fileset)
        if args.validation_fileset:
            validation = load_fileset(args.validation_fileset)
        else:
            train, validation = train.split_alternate()
    else:
        train = load_fileset(default_fileset("optimize", events=args.events or DEFAULT_TRAIN_EVENTS,
                                             progress=not args.quiet, **synthetic_preset(spec)))
        validation = load_fileset(args.validation_fileset or default_fileset(
            "validate", events=args.events or DEFAULT_EVENTS, progress=not args.quiet, **synthetic_preset(spec)))
    spec = _fit_to_filesets(args, spec, train, validation)
    settings = OptimizeSettings(steps=args.steps, objective=args.objective, binning=args.binning, nn=args.nn,
                                free=free, step_fraction=args.step_fraction, step_schedule=args.step_schedule,
                                hard_every=args.hard_every, keep_best=not args.last_point,
                                relax_end=args.relax_end, dtype=args.dtype)
    if getattr(args, "starts", 1) > 1:  # an ensemble of starts (analysis/multistart.py)
        from jacana.analysis.studies.multistart import cli_multistart

        return cli_multistart(args, spec, train, validation, settings)
    result = optimize(spec, train, validation, settings=settings, out=args.out, resume=args.resume,
                      progress=not args.quiet, on_bad_file=args.on_bad_file, plots=not args.no_plots,
                      workers=args.workers, scheduler=args.scheduler, profile=args.profile, coffea=args.coffea,
                      remote=remote, token_file=args.token_file)
    out = Path(args.out).resolve()
    b, a = result.sigma_mu_before, result.sigma_mu_after
    print(f"jacana optimize: {result.objective} over {len(result.history)} steps ({result.stopped}),"
          f" {result.seconds:.0f} s")
    print("  parameters: " + ", ".join(f"{k} {result.initial_params[k]:.4g} -> {v_:.4g}"
                                       for k, v_ in result.final_params.items() if not isinstance(v_, list)))
    for k, v_ in result.final_params.items():
        if isinstance(v_, list):
            print(f"  {k}: " + " ".join(f"{e:.4g}" for e in v_))
    if result.free_params and len(result.free_params) < len(result.initial_params):
        print("  free: " + ", ".join(result.free_params) + " (the other cuts stay at their start values)")
    sel = result.selected
    if sel and sel["point"] != "last":
        print(f"  kept the best hard-limit check on the training events: step {sel['step']}"
              f" ({sel['hard_objective']:.5g})")
    fo = result.final_objective
    gap = (f", relaxed/hard {fo['relaxed_over_hard']:.3f} at step {fo['relaxed_over_hard_step']}"
           if fo.get("relaxed_over_hard") is not None else "")
    print(f"  hard-limit objective at the end {result.hard_limit:.5g} (training events){gap};"
          f" {result.train_passes} passes over the training events")
    print(f"  held-out hard analysis (pyhf): expected sigma_{spec.poi['name']} {b:.4f} -> {a:.4f}"
          f" (ratio {a / b:.3f})")
    after = result.after or {}
    check, fit = after.get("workspace_check"), after.get(spec.poi["name"], {})
    if check is not None:
        print(f"  held-out workspace check (+-{check['sigmas']:g} sigma): "
              + ("passed" if check["passed"] else f"FAILED ({check['problem_count']} problems)"))
    if fit and not fit.get("converged", True):
        print("  WARNING: held-out fit to pseudo-data not converged: " + "; ".join(fit.get("warnings", [])[:3]))
    for w in after.get("model_warnings", [])[:5]:
        print(f"  WARNING: {w}")
    print(f"jacana: results in {out} (result.json, params.json, workspace.json, histograms.json,"
          f" checkpoint.json); plots in {out / 'plots'}")
    return 0


def cmd_bench(args) -> int:
    from jacana.bench.suite import format_table, run_bench

    result = run_bench(args.events, workers=args.workers, scheduler=args.scheduler, device=args.device,
                       repeats=args.repeats, out=args.out, data_dir=args.data_dir, progress=not args.quiet,
                       dtype=args.dtype, rows=args.rows, warm_threads=args.warm_threads)
    print(format_table(result))
    if args.out:
        print(f"jacana: benchmark written to {Path(args.out).resolve()}")
    return 0


def cmd_scan(args) -> int:
    from jacana.analysis.studies.hardobjective import check_bootstrap
    from jacana.analysis.studies.scan import format_summary, parse_axes, run_scan

    spec = _spec_from_args(args)
    axes = parse_axes(args.params, spec)  # bad names / ranges fail before any data is generated or read
    check_bootstrap(args.bootstrap)
    fileset = _fileset_from_args(args, "validate", spec)
    spec = _fit_to_filesets(args, spec, fileset)
    result = run_scan(spec, fileset, axes, args.out, gradient_results=args.gradient_result or (), hold=args.hold,
                      progress=not args.quiet, plots=not args.no_plots, on_bad_file=args.on_bad_file,
                      bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
    print(f"jacana scan: hard expected sigma_mu of {spec.name} on {fileset.source}")
    print(format_summary(result))
    print(f"jacana: results in {Path(args.out).resolve()} (scan.json" + ("" if args.no_plots else ", plots/scan.png")
          + ")")
    return 0


def cmd_baselines(args) -> int:
    from jacana.analysis.studies.baselines import run_baselines, train_and_validation
    from jacana.analysis.studies.scan import parse_axes

    spec = _spec_from_args(args)
    if "grid" in args.method:
        parse_axes(args.grid, spec)  # fail early on a bad grid
    train, validation = train_and_validation(args.fileset, args.validation_fileset, args.events,
                                             progress=not args.quiet)
    spec = _fit_to_filesets(args, spec, train, validation)
    out = run_baselines(spec, train, validation, args.out, methods=args.method, budget=args.budget, seed=args.seed,
                        names=args.params, grid=args.grid, gradient_results=args.gradient_result or (), scan=args.scan,
                        trace_heldout=args.trace_heldout, progress=not args.quiet, plots=not args.no_plots,
                        on_bad_file=args.on_bad_file)
    print(f"jacana baselines: {', '.join(args.method)} on {train.source}; held-out: {validation.source}")
    print(out["markdown"])
    print(f"jacana: results in {Path(args.out).resolve()} (comparison.md, comparison.json, baselines.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jacana", description=__doc__ or "jacana")
    parser.add_argument("--version", action="version", version=f"jacana {jacana.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommands = sub.choices  # name -> its parser (unknown options get a suggestion from it)

    p = sub.add_parser("generate", help="write synthetic AGC NanoAOD-like samples and their fileset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--events", type=_positive_int, default=1_000_000, help="total events over all samples (default 1,000,000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--preset", default="agc", choices=preset_names(),
                   help="which samples: the AGC ttbar analysis's (default) or the single-top t-channel analysis's")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="run the analysis in hard mode and fit it with pyhf")
    _add_analysis_options(p)
    p.add_argument("--params", help="params.json (e.g. from jacana optimize) overriding the config's parameter values")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-plots", action="store_true", help="no data/MC plots (pre- and post-fit) in OUT/plots")
    p.add_argument("--impacts", action="store_true", help="also pull and impact (ranking) plots in OUT/plots (cabinetry,"
                   " else jacana's impacts): two refits per nuisance parameter")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("optimize", help="optimise the analysis end to end for its expected sensitivity")
    _add_analysis_options(p)
    p.add_argument("--validation-fileset",
                   help="held-out fileset for the hard validation (default: the embedded validation samples,"
                        " or every other file of --fileset)")
    p.add_argument("--steps", type=_positive_int, default=40, help="optimisation steps (default 40)")
    p.add_argument("--objective", choices=objective_names(), default="sigma_mu",
                   help="what to optimise (default: the expected uncertainty on the config's POI)")
    p.add_argument("--binning", action="store_true",
                   help="optimise the interior bin edges of every region too (gradient by VJP: 2 passes a step)")
    p.add_argument("--nn", action="store_true",
                   help="replace HT in 4j1b by a small neural network (jet and lepton features) trained in place")
    p.add_argument("--free", nargs="+", default=None, metavar="NAME",
                   help="optimise only these cut parameters (e.g. --free jet_pt_min btag_min); the others stay at"
                        " the config's values (default: all cuts)")
    p.add_argument("--step-fraction", type=_step_fraction, default=0.025, metavar="F|config",
                   help="Adam step of each cut as a fraction of its bound range (default 0.025); 'config': each"
                        " parameter's learning_rate from the config")
    p.add_argument("--step-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine (default): the step decays to 0.1 x its start by the last step; constant: it stays")
    p.add_argument("--relax-end", type=_relax_end, default=0.1, metavar="SCALE",
                   help="the cuts' relaxation narrows from the config's widths (1) to SCALE x them over the first"
                        " three quarters of the steps (default 0.1; 1: it stays as wide: see docs/trust.md for"
                        " when that does better)")
    p.add_argument("--hard-every", type=_non_negative_int, default=5,
                   help="evaluate the hard-limit objective on the training events every N steps and at the last"
                        " (each is one more pass; default 5; 0: never)")
    p.add_argument("--last-point", action="store_true",
                   help="end at the last point, not at the best hard-limit check on the training events")
    p.add_argument("--dtype", choices=BATCH_DTYPES, default="float64",
                   help="precision of the event arithmetic (default float64); float32: mixed precision, float64"
                        " histogram sums (within 1e-5 of float64 at the default relaxation, less as it narrows:"
                        " docs/bench.md, figure 9; in-process and dask executors)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.json")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="run on a local dask cluster of N worker processes (default: in this process)")
    p.add_argument("--scheduler", help="run on an existing dask scheduler (e.g. tcp://host:8786)")
    p.add_argument("--coffea", choices=("iterative", "futures", "dask"), default=None,
                   help="run every step through coffea's Runner with this executor (futures: --workers processes;"
                        " each step re-reads the files: for facilities that run coffea, slower than the others)")
    p.add_argument("--profile", help="facility profile: local, coffea-casa, fermilab-eaf, purdue-af, htcondor-gpu,"
                                     " or a YAML path (see docs/facility.md)")
    p.add_argument("--remote-stage", nargs="+", metavar="STAGE=HOST:PORT", default=None,
                   help="replace a stage of the chain by one served with `jacana serve-stage` (or a peer in another"
                        " language) that declares the same signature; STAGE: objective")
    p.add_argument("--token-file", default=None,
                   help="with --remote-stage: the file whose first line is the server's token"
                        " (default: $JACANA_STAGE_TOKEN)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--starts", type=_positive_int, default=1,
                   help="run K optimisations from spread starting points (start 0: the config's) into OUT/start_<k>/"
                        " and report their spread in OUT/multistart.json (parallel with --workers/--scheduler)")
    p.add_argument("--start-spread", type=float, default=0.25,
                   help="with --starts: each start lies within this fraction of each parameter's bound range of"
                        " the config's value (default 0.25; 1 = anywhere inside the bounds)")
    p.add_argument("--start-seed", type=int, default=0, help="with --starts: seed of the Latin hypercube of starts")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("bench", help="measure every performance figure against its baseline (see docs/bench.md)")
    p.add_argument("--events", type=_positive_int, default=1_000_000, help="synthetic AGC events (default 1,000,000)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive_int, default=None,
                       help="also benchmark a local dask cluster of N worker processes (figure 6)")
    where.add_argument("--scheduler", help="also benchmark the workers of this dask scheduler (figure 6; they must"
                                           " see --data-dir)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where JAX runs (default cpu)")
    p.add_argument("--dtype", choices=BATCH_DTYPES, default="float64",
                   help="precision of the event batches (default float64); float32 is mixed precision (float32"
                        " event arithmetic, float64 histogram sums) and adds figure 9, its deviation from float64")
    p.add_argument("--rows", metavar="FIGURES",
                   help="only these figures, comma-separated (e.g. 1,3,5,7,9: what a GPU run needs; 7 is rows 7a/7b,"
                        " 9 is 9a/9b); default 1-8 (and 9 with --dtype float32)")
    p.add_argument("--warm-threads", type=int, default=1, metavar="N",
                   help="compile the gradient step's programs in N threads before timing (default 1: one after"
                        " another); on a many-core GPU host it shortens the run, not the figures")
    p.add_argument("--repeats", type=_positive_int, default=3, help="runs per figure; the median is reported (default 3)")
    p.add_argument("--out", help="also write the rows and all measurements to this JSON file")
    p.add_argument("--data-dir", help="generate (or reuse) the events under this folder (default: a temporary one)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("scan", help="grid scan of the hard analysis' expected sigma_mu over one or two parameters")
    _add_analysis_options(p)
    p.add_argument("--params", nargs="+", required=True, metavar="NAME=LO:HI:N",
                   help="one or two scanned parameters, e.g. jet_pt_min=20:40:9 btag_min=0.3:0.7:9")
    p.add_argument("--gradient-result", nargs="+", metavar="RESULT",
                   help="jacana optimize results (result.json or its folder; multistart.json or its folder: every"
                        " start) to evaluate on the same events, judge against the grid's best and mark")
    p.add_argument("--hold", choices=("config", "gradient"), default="config",
                   help="value of the parameters not scanned: the config's (default) or the gradient optimum's")
    p.add_argument("--bootstrap", type=int, default=0, metavar="B",
                   help="also evaluate every point on B Poisson-bootstrap replicas of the events (same pass):"
                        " the landscape's MC noise, and which points the best is not significantly better"
                        " than (default 0: none; 30 is plenty)")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (a scan.json there is resumed)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("baselines", help="gradient-free optimisers (random, CMA-ES, grid) of the hard analysis and"
                                         " the comparison table with a gradient run")
    _add_analysis_options(p)
    p.add_argument("--validation-fileset", help="held-out fileset (default: the embedded validation samples, or"
                                                " every other file of --fileset)")
    p.add_argument("--method", nargs="+", choices=("random", "cmaes", "grid"), default=["random", "cmaes"],
                   help="methods to run (default: random cmaes)")
    p.add_argument("--budget", type=_positive_int, default=60,
                   help="full passes over the training events per method (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--params", nargs="+", default=None, metavar="NAME",
                   help="parameters random search and CMA-ES tune (default: the four cuts the gradient tunes)")
    p.add_argument("--grid", nargs="+", default=["jet_pt_min=20:40:9", "btag_min=0.3:0.7:9"], metavar="NAME=LO:HI:N",
                   help="the grid of --method grid (default jet_pt_min=20:40:9 btag_min=0.3:0.7:9)")
    p.add_argument("--gradient-result", nargs="+", metavar="RESULT",
                   help="jacana optimize results (result.json or its folder; multistart.json or its folder: every"
                        " start): a row each, passes counted the same way")
    p.add_argument("--scan", help="a finished jacana scan (scan.json): add the held-out grid as a reference row;"
                                  " a scan made with --bootstrap on the same held-out events also judges every"
                                  " method's point against the grid's best on the same replicas")
    p.add_argument("--trace-heldout", action="store_true",
                   help="also evaluate every improvement on the held-out events (reporting only, not counted)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_baselines)

    from jacana.protocol.cli import register as register_serve_stage

    register_serve_stage(sub)
    return parser


def _check_before_any_data(parser, args) -> None:
    """What the command line alone decides, refused at once (not after minutes of reading events)."""
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir() and args.command != "bench":
        parser.error(f"--out {out}: an existing file, not a folder")
    if getattr(args, "resume", False) and not (Path(out) / "checkpoint.json").is_file():
        parser.error(f"--resume: no checkpoint to resume in {out} (no {Path(out) / 'checkpoint.json'});"
                     " run without --resume to start afresh")


def _parse(parser, argv):
    """Parse, and for an unknown option of a subcommand name the closest one it has."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        import difflib

        options = [o for a in parser.subcommands[args.command]._actions for o in a.option_strings]
        hints = []
        for e in extra:
            close = difflib.get_close_matches(e.split("=")[0], options, n=1) if e.startswith("-") else []
            hints.append(f"{e} (did you mean {close[0]}?)" if close else e)
        parser.error(f"jacana {args.command}: unrecognized arguments: {' '.join(hints)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    _check_before_any_data(parser, args)
    os.environ.setdefault("MPLBACKEND", "Agg")  # files only, no windows (the plots module leaves it to us)
    # pyhf logs a failed minimisation as an error with scipy's whole OptimizeResult and an AssertionError
    # traceback, then raises; jacana catches that and reports it in one line (result.json, the summary)
    logging.getLogger("pyhf.optimize.mixins").setLevel(logging.CRITICAL)
    if args.command in ("optimize", "evaluate"):
        from jacana.facility.jaxsetup import configure_jax

        configure_jax()
    try:
        return int(args.func(args) or 0)
    except JacanaError as exc:
        print(f"jacana: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jacana: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
