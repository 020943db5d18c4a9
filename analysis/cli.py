"""The ``jacana`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jacana.stages.errors import JacanaError


def _add_analysis_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fileset", help="AGC-style fileset JSON (default: the embedded synthetic samples)")
    p.add_argument("--config", help="analysis config YAML (default: the embedded AGC ttbar config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter or config entry, e.g. jet_pt_min=25 or branches.jet_btag=Jet_btagDeepFlavB")
    p.add_argument("--events", type=int, default=None,
                   help="events of the embedded synthetic samples (default 1,000,000)")
    p.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail",
                   help="a missing or unreadable input file stops the run (fail, default) or is skipped and"
                        " recorded in result.json (skip; nothing is re-weighted)")


def _spec_from_args(args):
    from jacana.stages.spec import load_spec

    return load_spec(args.config, overrides=args.overrides)


def _fileset_from_args(args, role: str):
    from jacana.facility.datasets import DEFAULT_EVENTS, default_fileset
    from jacana.stages.fileset import load_fileset

    path = args.fileset or default_fileset(role, events=args.events or DEFAULT_EVENTS)
    return load_fileset(path)


def cmd_generate(args) -> int:
    from jacana.facility.synthetic import generate

    path = generate(args.out, events=args.events, seed=args.seed, progress=not args.quiet)
    print(f"jacana: wrote synthetic AGC samples; fileset: {path}")
    return 0


def cmd_evaluate(args) -> int:
    from jacana.analysis.evaluate import format_summary, hard_evaluation, load_params_file, write_evaluation

    spec = _spec_from_args(args)
    if args.params:
        spec = spec.with_params(load_params_file(args.params))
    fileset = _fileset_from_args(args, "validate")
    evaluation = hard_evaluation(spec, fileset, progress=not args.quiet, on_bad_file=args.on_bad_file)
    paths = write_evaluation(args.out, evaluation, extra={"fileset": fileset.source, "config": spec.source})
    print(f"jacana evaluate: {spec.name} on {fileset.source}")
    print(format_summary(spec, evaluation["result"]))
    for skipped in evaluation["result"]["inputs"]["skipped_files"]:
        print(f"  WARNING: skipped {skipped['path']}: {skipped['error']}")
    print(f"jacana: results in {Path(args.out).resolve()} ({', '.join(p.name for p in paths.values())})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jacana", description=__doc__ or "jacana")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="write synthetic AGC NanoAOD-like samples and their fileset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--events", type=int, default=1_000_000, help="total events over all samples (default 1,000,000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="run the AGC analysis in hard mode and fit it with pyhf")
    _add_analysis_options(p)
    p.add_argument("--params", help="params.json (e.g. from jacana optimize) overriding the config's parameter values")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
