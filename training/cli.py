"""`quaver`: one command line for the whole project.

    quaver data --out data/bench                 # synthetic audio-QA benchmark
    quaver build-base --out artifacts/base       # embedded default's base, from pinned packages
    quaver prepare-dcase --dev dev.json --audio audio --out data/dcase5  # train/calib/test
    quaver train --config configs/tiny-ivon.yaml # the stage the config names (pretrain/adapt/finetune)
    quaver pipeline --work .                     # data -> tiny base -> IVON + AdamW -> evaluate
    quaver default                               # reproduce the embedded default (app/default/)
    quaver report --seeds 0,1,2                  # IVON vs AdamW -> docs/results.md
    quaver ask clip.wav --question "..." --choice a --choice b
    quaver serve                                 # the web service (app/)

Each subcommand is a plain function; heavy modules are imported inside them so `quaver --help`
stays instant and `serve`/`ask` never import the training pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing it for real would load torch at startup
    from training.eval.predictions import PredictionRun
    from training.recipes.default import DefaultRecipe


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a clear usage error otherwise)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _split_sizes(specs: list[str] | None) -> dict[str, int]:
    """["pretrain=6000", ...] -> {"pretrain": 6000}; a malformed spec is a ConfigError."""
    from training.data.generate import REAL_SPLITS, SPLITS

    return _name_counts(specs, "--size", "SPLIT", (*SPLITS, *REAL_SPLITS))


def _pretrain_weights(specs: list[str] | None) -> dict[str, int]:
    """["rhythm=2", ...] -> {"rhythm": 2}; a malformed spec is a ConfigError."""
    from training.config import ConfigError
    from training.data.families import DEFAULT_FAMILIES

    weights = _name_counts(specs, "--pretrain-weight", "FAMILY", DEFAULT_FAMILIES)
    if any(k < 1 for k in weights.values()):
        raise ConfigError(f"--pretrain-weight: K must be >= 1, got {weights}")
    return weights


def _name_counts(specs: list[str] | None, flag: str, what: str, names) -> dict[str, int]:
    from training.config import ConfigError

    out = {}
    for spec in specs or []:
        name, _, n = spec.partition("=")
        if name not in names or not n.isdigit():
            raise ConfigError(
                f"{flag} {spec!r}: want {what}=N with {what} one of {', '.join(names)}"
            )
        out[name] = int(n)
    return out


def cmd_data(args: argparse.Namespace) -> None:
    from training.data.generate import BenchmarkConfig, generate_benchmark

    cfg = BenchmarkConfig(
        seed=args.seed,
        workers=args.workers,
        pretrain_weights=_pretrain_weights(args.pretrain_weight),
        real_sources=args.real_sources,
        **_split_sizes(args.size),
    )
    out = generate_benchmark(cfg, Path(args.out))
    print(f"benchmark written to {out}")


def cmd_prepare_dcase(args: argparse.Namespace) -> None:
    from training.config import ConfigError
    from training.recipes.dcase import prepare_dcase

    fractions = tuple(float(f) for f in args.fractions.split(","))
    try:
        out = prepare_dcase(Path(args.dev), Path(args.audio), Path(args.out), args.seed, fractions)
    except ValueError as exc:  # no usable questions, bad fractions
        raise ConfigError(str(exc)) from exc
    meta = json.loads((out / "dataset.json").read_text())
    print(f"dataset written to {out}: {meta['counts']}")


def cmd_build_base(args: argparse.Namespace) -> None:
    from training.base.build import build_base

    print(f"base model at {build_base(Path(args.out), force=args.force)}")


def _stage(path: Path) -> str:
    """The stage a config file names in its `stage` key (pretrain, adapt or finetune)."""
    import yaml

    from training.config import STAGES, ConfigError

    data = yaml.safe_load(path.read_text()) or {}
    stage = data.get("stage") if isinstance(data, dict) else None
    if stage not in STAGES:
        raise ConfigError(
            f"{path}: `stage` must name the stage ({', '.join(STAGES)}), got {stage!r}"
        )
    return stage


def _overrides(pairs: list[str] | None) -> dict:
    import yaml

    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def cmd_train(args: argparse.Namespace) -> None:
    from training.config import FinetuneConfig, PretrainConfig, load_config

    path = Path(args.config)
    stage = _stage(path)
    overrides = _overrides(args.set)
    if stage == "pretrain":
        from training.stages.pretrain import pretrain

        print(f"base checkpoint at {pretrain(load_config(path, PretrainConfig, overrides))}")
    else:
        from training.stages.finetune import finetune

        print(f"posterior exported to {finetune(load_config(path, FinetuneConfig, overrides))}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    """The tiny pipeline end to end, timed: data -> stage 1 -> IVON and AdamW -> evaluation."""
    from training.recipes.tiny import run_pipeline

    summary = run_pipeline(
        Path(args.work), Path(args.configs), args.seed, args.samples, _split_sizes(args.size)
    )
    print(json.dumps({"times_s": summary["times_s"], "test": summary["test"]}, indent=2))
    print(f"report: {Path(args.work) / 'pipeline.md'}")


def default_recipe(args: argparse.Namespace) -> DefaultRecipe:
    """The DefaultRecipe that `quaver default` arguments describe."""
    from training.recipes.default import DefaultRecipe

    sizes: dict = dict(_split_sizes(args.size))
    if args.even_pretrain:  # every family the same share of pretrain (BENCHMARK's weights off)
        sizes["pretrain_weights"] = {}
    return DefaultRecipe(
        work=Path(args.work),
        base_dir=Path(args.base),
        configs=Path(args.configs),
        ship_dir=None if args.no_ship else Path(args.ship),
        report=Path(args.report),
        real_mix=args.real_mix,
        sizes=sizes,
    )


def cmd_default(args: argparse.Namespace) -> None:
    """The embedded default's recipe end to end, shipped into app/default/."""
    from training.recipes.default import run_default

    summary = run_default(default_recipe(args))
    print(json.dumps(summary["times_s"], indent=2))


def _prediction_run(args: argparse.Namespace) -> PredictionRun:
    """The PredictionRun that `quaver evaluate` / `quaver calibrate` arguments describe."""
    from training.eval.predictions import PredictionRun

    return PredictionRun(
        Path(args.base),
        Path(args.posterior),
        Path(args.data),
        samples=args.samples,
        seed=args.seed,
        prefix_cache=Path(args.prefix_cache) if args.prefix_cache else None,
        device=args.device,
        dtype=args.dtype,
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training.eval.evaluate import evaluate_posterior, format_table

    res = evaluate_posterior(
        _prediction_run(args), args.split, out_dir=Path(args.out) if args.out else None
    )
    print(format_table(res))
    if args.out:
        print(f"metrics and plots in {args.out}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from training.eval.evaluate import calibrate_posterior

    table = calibrate_posterior(
        _prediction_run(args), args.split, delta=args.delta, method=args.method
    )
    for t in table["targets"]:
        thr = "abstain always" if t["threshold"] is None else f"threshold {t['threshold']:.4f}"
        print(
            f"max_risk {t['max_risk']:<5} {thr:<24} coverage {t['coverage']:.3f}  "
            f"bound {t['risk_bound']}"
        )
    print(f"written to {Path(args.posterior) / 'quaver.json'}")


def cmd_report(args: argparse.Namespace) -> None:
    """IVON vs AdamW over several fine-tuning seeds -> results.md, results.json and plots."""
    from training.recipes.report import ReportConfig, run_report

    cfg = ReportConfig(
        ivon_config=Path(args.ivon_config),
        adamw_config=Path(args.adamw_config),
        seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()),
        work=Path(args.work),
        out=Path(args.out),
        base_dir=Path(args.base) if args.base else None,
        data_dir=Path(args.data) if args.data else None,
        threads=args.threads,
        samples=tuple(int(k) for k in args.ks.split(",") if k.strip()),
        large_samples=tuple(int(k) for k in args.large_ks.split(",") if k.strip()),
        large_splits=tuple(sp.strip() for sp in args.large_splits.split(",") if sp.strip()),
        device=args.device,
        ensemble_size=args.ensemble_size,
        n_boot=args.n_boot,
        write_decision=args.write_decision,
        control_probe=not args.no_control_probe,
    )
    results = run_report(cfg)
    for g in results["goals"]:
        verdict = "n/a" if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
        print(f"{verdict:<4} ({g['split']}) {g['goal']}: {g['detail']}")


def cmd_ask(args: argparse.Namespace) -> None:
    from app.ask import ask

    result = ask(
        Path(args.audio),
        args.question,
        args.choice,
        model_dir=args.model,
        posterior_dir=args.posterior,
        samples=args.samples,
        seed=args.seed,
    )
    print(json.dumps(result, indent=2))


def cmd_serve(args: argparse.Namespace) -> None:
    from app.server import serve

    serve(host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quaver", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="generate the synthetic audio-QA benchmark")
    d.add_argument("--out", default="data/bench")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", action="append", metavar="SPLIT=N", help="override a split's size")
    d.add_argument(
        "--pretrain-weight",
        action="append",
        metavar="FAMILY=K",
        help="give FAMILY K times the items of the others in `pretrain`",
    )
    d.add_argument("--workers", type=int, default=1, help="rendering processes")
    d.add_argument(
        "--real-sources",
        action="store_true",
        help="add the real-recording families and test_real (docs/real_sounds.md)",
    )
    d.set_defaults(func=cmd_data)

    pd = sub.add_parser(
        "prepare-dcase", help="DCASE 2025 Task 5 style dev set -> train/calib/test directory"
    )
    pd.add_argument("--dev", required=True, help="dev questions (.json/.jsonl or a directory)")
    pd.add_argument("--audio", required=True, help="folder the questions' audio is under")
    pd.add_argument("--out", default="data/dcase5")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--fractions", default="0.6,0.2,0.2", help="train,calib,test shares")
    pd.set_defaults(func=cmd_prepare_dcase)

    b = sub.add_parser("build-base", help="assemble the embedded default's base model")
    b.add_argument("--out", default="artifacts/base")
    b.add_argument("--force", action="store_true")
    b.set_defaults(func=cmd_build_base)

    t = sub.add_parser("train", help="run a training stage from a YAML config")
    t.add_argument("--config", required=True)
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("pipeline", help="tiny pipeline end to end (data, train, evaluate)")
    pl.add_argument("--work", default=".")
    pl.add_argument("--configs", default=str(Path(__file__).resolve().parent.parent / "configs"))
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--samples", type=int, default=8, help="K for calibration and evaluation")
    pl.add_argument("--size", action="append", metavar="SPLIT=N", help="override a split's size")
    pl.set_defaults(func=cmd_pipeline)

    dm = sub.add_parser("default", help="reproduce the embedded default (app/default/)")
    dm.add_argument("--work", default="work/default")
    dm.add_argument("--base", default="artifacts/base", help="assembled base directory")
    dm.add_argument("--configs", default=str(Path(__file__).resolve().parent.parent / "configs"))
    dm.add_argument("--ship", default="app/default", help="where the shipped files go")
    dm.add_argument("--no-ship", action="store_true", help="train and evaluate only")
    dm.add_argument(
        "--real-mix",
        dest="real_mix",
        action="store_true",
        default=True,
        help="the benchmark with real recordings, controls and test_real (recipes/default.py;"
        " the shipped default's, and the default)",
    )
    dm.add_argument(
        "--synthetic",
        dest="real_mix",
        action="store_false",
        help="the synthetic-only benchmark of the earlier default (no real recordings)",
    )
    dm.add_argument("--report", default="docs/default_model.md", help="per-family results")
    dm.add_argument(
        "--size",
        action="append",
        metavar="SPLIT=N",
        help="override a split's size (e.g. pretrain=4800)",
    )
    dm.add_argument(
        "--even-pretrain",
        action="store_true",
        help="every family the same share of pretrain (the real mix weights synthetic ones 2)",
    )
    dm.set_defaults(func=cmd_default)

    for name, helptext in (
        ("evaluate", "metrics and plots of a posterior on a split"),
        ("calibrate", "guaranteed-risk thresholds into quaver.json"),
    ):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("--base", required=True, help="base model directory")
        e.add_argument("--posterior", required=True, help="posterior directory")
        e.add_argument("--data", default="data/bench", help="benchmark directory")
        e.add_argument("--split", default="test" if name == "evaluate" else "calib")
        e.add_argument("--samples", type=_positive_int, default=8, help="K (1: the mean)")
        e.add_argument("--seed", type=int, default=0)
        e.add_argument(
            "--prefix-cache",
            default=None,
            help="folder for hidden states below the LoRA layers, reused across posteriors",
        )
        e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
        e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
        if name == "evaluate":
            e.add_argument("--out", default=None, help="folder for metrics.json and plots")
            e.set_defaults(func=cmd_evaluate)
        else:
            e.add_argument("--delta", type=float, default=0.05)
            e.add_argument("--method", choices=("sgr", "ltt"), default="sgr")
            e.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("report", help="results report: IVON vs AdamW over fine-tuning seeds")
    r.add_argument("--ivon-config", default="configs/default-ivon.yaml")
    r.add_argument("--adamw-config", default="configs/default-adamw.yaml")
    r.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
    r.add_argument("--work", default="work/default", help="holds the shared prefix cache")
    r.add_argument("--out", default="docs", help="results.md, results.json, results/*.png")
    r.add_argument("--base", default=None, help="override both configs' base_dir")
    r.add_argument("--data", default=None, help="override both configs' data_dir")
    r.add_argument("--threads", type=int, default=0, help="torch threads for prediction")
    r.add_argument("--device", default=None, help="prediction device (default: each run's own)")
    r.add_argument("--ks", default="1,4,8,16,32", help="IVON BMA sample counts (must include 8)")
    r.add_argument(
        "--large-ks", default="", help="IVON BMA sizes above --ks, drawn on --large-splits only"
    )
    r.add_argument("--large-splits", default="test", help="splits the --large-ks are drawn on")
    r.add_argument("--ensemble-size", type=int, default=4, help="AdamW deep ensemble (1: none)")
    r.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples")
    r.add_argument(
        "--write-decision",
        action="store_true",
        help="store each seed's served score (chosen on calib) in its IVON quaver.json",
    )
    r.add_argument(
        "--no-control-probe",
        action="store_true",
        help="do not fit the control probe on pretrain (no 'answerable' score)",
    )
    r.set_defaults(func=cmd_report)

    a = sub.add_parser("ask", help="answer one question about an audio file")
    a.add_argument("audio")
    a.add_argument("--question", required=True)
    a.add_argument("--choice", action="append", required=True)
    a.add_argument("--model", default=None, help="model directory (default: embedded default)")
    a.add_argument("--posterior", default=None, help="posterior directory")
    a.add_argument("--samples", type=int, default=8)
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=cmd_ask)

    s = sub.add_parser("serve", help="run the web service")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _user_error(exc):
            raise
        # the user's input is wrong (a path, a config, a posterior): say what, without a traceback
        print(f"quaver {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _user_error(exc: Exception) -> bool:
    """Errors caused by the command's input rather than by a bug (those keep their traceback)."""
    # Imported here: these modules load torch/transformers, which `quaver --help` should not.
    from app.modeling import ModelLoadError
    from app.posterior import PosteriorError
    from training.config import ConfigError

    return isinstance(exc, (FileNotFoundError, ConfigError, PosteriorError, ModelLoadError))


if __name__ == "__main__":
    sys.exit(main())
