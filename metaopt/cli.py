"""The ``metaopt`` command: run recipes, resume runs, re-compare, list recipes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from metaopt import compare as comparing
from metaopt.allocator import keep_freed_memory
from metaopt.config import (
    RECIPE_DIR,
    ConfigError,
    Experiment,
    build,
    import_target,
    load_recipe,
    recipe_pipeline,
    to_yaml,
    train_config_for,
    validate,
)
from metaopt.analysis.tracking import plot_tracked, sensitivity_tracker
from metaopt.log import CONFIG_FILE, Run
from metaopt.train import DivergenceError, MetaTrainer

logger = logging.getLogger("metaopt")

EPILOG = """examples:
  metaopt recipes                                  list the bundled recipes
  metaopt run quickstart                           meta-train and compare (W&B offline)
  metaopt run quickstart train.steps=200 wandb.mode=disabled
  metaopt resume runs/quickstart/20261123-101500-000000
  metaopt compare runs/quickstart/20261123-101500-000000 compare.num_tasks=4000
  metaopt bench compare                            time a hot path against its reference
"""


# ---------------------------------------------------------------------- the pipeline
def _open_run(config: DictConfig, path: Path | None = None) -> Run:
    run = Run(
        config.name,
        OmegaConf.to_container(config, resolve=True),
        root=config.output_dir,
        wandb_mode=config.wandb.mode,
        project=config.wandb.project,
        entity=config.wandb.entity,
        tags=list(config.wandb.tags),
        path=path,
    )
    run.write_config(to_yaml(config))
    return run


def _trainer(experiment: Experiment, name: str, run: Run | None, **changes) -> MetaTrainer:
    """The MetaTrainer of one learner with its recipe settings; bad settings become a ConfigError."""
    config = experiment.config
    settings = OmegaConf.to_container(train_config_for(config, name), resolve=True) | changes
    try:
        return MetaTrainer(experiment.learners[name], experiment.family, name=name, seed=config.seed,
                           device=config.device, run=run, progress=config.progress, **settings)
    except ValueError as error:
        raise ConfigError(f"train settings of learner {name!r}: {error}") from error


def _trainable(experiment: Experiment) -> list[str]:
    return [name for name, learner in experiment.learners.items() if learner.is_trainable]


def _validation_hooks(experiment: Experiment, name: str) -> list:
    """With ``compare.analysis`` asking for ``sensitivity``, track it against the explicit solvers during training."""
    names = {a if isinstance(a, str) else a.get("name") for a in experiment.config.compare.analysis}
    learner = experiment.learners[name]
    references = {n: other for n, other in experiment.learners.items()
                  if not other.implicit and not other.is_trainable}
    if "sensitivity" not in names or not learner.implicit or not references:
        return []
    return [sensitivity_tracker(references)]


def _train_all(experiment: Experiment, run: Run, resume: bool) -> None:
    """Meta-train every learner that has meta-parameters, continuing from checkpoints when resuming."""
    for name in _trainable(experiment):
        trainer = _trainer(experiment, name, run, on_validate=_validation_hooks(experiment, name))
        if resume and trainer.resume() and trainer.step >= trainer.steps:
            logger.info("%s already trained (%d steps)", name, trainer.step)
            continue
        result = trainer.fit()
        tracked = plot_tracked(trainer.history, title=name)
        if tracked is not None:
            run.save_figure(tracked, f"sensitivity_vs_step_{name}")
        run.summary({f"{name}/final_loss": result.final_loss, f"{name}/val_loss": result.val_loss,
                     f"{name}/train_seconds": result.seconds, f"{name}/steps": result.steps})


def _load_trained(experiment: Experiment, run: Run) -> None:
    """Load each trainable learner's final checkpoint from a finished run."""
    for name in _trainable(experiment):
        path = MetaTrainer.latest_checkpoint(run.checkpoint_dir / name)
        if path is None:
            raise ConfigError(f"{run.path} has no checkpoint for learner {name!r}; run `metaopt resume {run.path}`")
        experiment.learners[name].load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["learner"])


def _compare_and_report(experiment: Experiment, run: Run) -> comparing.Comparison:
    config = experiment.config
    c = config.compare
    result = comparing.compare(
        experiment.learners, experiment.eval_family, support_sizes=list(c.support_sizes), num_tasks=c.num_tasks,
        query=c.query, seed=config.seed + 2_000_029, bootstrap=c.bootstrap, chunk_size=c.chunk_size,
        device=config.device, claims=[OmegaConf.to_container(claim) for claim in config.claims],
        progress=config.progress, analysis=OmegaConf.to_container(c.analysis, resolve=True),
    )
    results_path = run.save_json(result.to_dict(), "results")
    figure_path = run.save_figure(comparing.plot(result, title=config.name), f"{result.metric}_vs_k")
    analysis_figure = comparing.plot_similarity(result, title=config.name)
    if analysis_figure is not None:
        figure_path = f"{figure_path}\n         {run.save_figure(analysis_figure, 'analysis_vs_k')}"
    k_last = result.support_sizes[-1]
    run.summary({f"compare/{name}/{result.metric}@k={k_last}": curve.mean[-1] for name, curve in result.curves.items()})
    for i, k in enumerate(result.support_sizes):
        run.log({f"compare/{name}/{result.metric}": curve.mean[i] for name, curve in result.curves.items()}
                | {"compare/k": k})
    print(comparing.format_table(result))
    print(f"\nresults: {results_path}\nplot:    {figure_path}\nrun:     {run.path}")
    return result


def _set_threads(config: DictConfig) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)


def _execute(config: DictConfig, run_path: Path | None, resume: bool, train: bool) -> int:
    torch.manual_seed(config.seed)  # learners' initial meta-parameters are part of the experiment
    experiment = build(config)  # every component is built (and checked) before any work
    for name in _trainable(experiment) if train else ():
        _trainer(experiment, name, None, val_tasks=1)
    _set_threads(config)
    with _open_run(config, run_path) as run:
        logger.info("run folder: %s", run.path)
        if train:
            _train_all(experiment, run, resume)
        else:
            _load_trained(experiment, run)
        _compare_and_report(experiment, run)
        _evaluate(experiment, run)
    return 0


def _evaluate(experiment: Experiment, run: Run) -> None:
    """The recipe's extra evaluations (``evaluate:``), each called with the experiment and the run."""
    for i, spec in enumerate(experiment.config.evaluate):
        options = OmegaConf.to_container(spec, resolve=True)
        target = import_target(options.pop("_target_"), f"evaluate[{i}]")
        target(experiment=experiment, run=run, **options)


# ---------------------------------------------------------------------- subcommands
def cmd_run(args: argparse.Namespace) -> int:
    pipeline, path = recipe_pipeline(args.recipe)
    if pipeline == "optimizer":
        from metaopt.optimizer_experiment import main as run_optimizer_experiment

        return run_optimizer_experiment([str(path), *args.overrides])
    config = load_recipe(str(path), args.overrides)
    return _execute(config, None, resume=False, train=True)


def _run_config(run_dir: str, overrides: Sequence[str]) -> tuple[DictConfig, Path]:
    path = Path(run_dir)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{path} is not a run folder (no {CONFIG_FILE}); pass a folder made by `metaopt run`")
    return validate(OmegaConf.load(config_file), overrides, source=str(config_file)), path


def cmd_resume(args: argparse.Namespace) -> int:
    config, path = _run_config(args.run_dir, args.overrides)
    return _execute(config, path, resume=True, train=True)


def cmd_compare(args: argparse.Namespace) -> int:
    config, path = _run_config(args.run_dir, args.overrides)
    return _execute(config, path, resume=False, train=False)


def _summary(description: str, width: int = 100) -> str:
    """A recipe's description on one line, cut to ``width`` characters."""
    text = " ".join(description.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_recipes(args: argparse.Namespace) -> int:
    del args
    found = {p.resolve(): p for p in [*RECIPE_DIR.glob("*.yaml"), *Path("recipes").glob("*.yaml")]}
    recipes = sorted(found.values(), key=lambda p: p.stem)
    width = max((len(p.stem) for p in recipes), default=0) + 2
    for path in recipes:
        description = OmegaConf.load(path).get("description", "") or ""
        print(f"{path.stem.ljust(width)}{_summary(description)}")
    print("\nfull descriptions: the recipe files in " + str(RECIPE_DIR))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    root = RECIPE_DIR.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise ConfigError(f"benchmarks/ ships with the source checkout, not found under {root}; run from a clone")
    sys.path.insert(0, str(root))
    from benchmarks.__main__ import main as run_benchmarks

    return run_benchmarks([*args.names, "--threads", str(args.threads)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaopt",
        description="Meta-train implicit (in-context) and explicit optimisers and compare them on the same episodes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    overrides_help = "config overrides as key=value, e.g. train.steps=500 wandb.mode=disabled"
    run_dir_help = "a run folder made by `metaopt run`"
    commands = [
        ("run", cmd_run, ("recipe", "recipe name (see `metaopt recipes`) or path to a YAML file"),
         "meta-train a recipe's learners, then compare them",
         "Meta-train every learner with meta-parameters on the recipe's task family, then compare all learners "
         "on the same held-out episodes. Writes runs/<name>/<time>/ (config, metrics.jsonl, results.json, "
         "figures, checkpoints) and a W&B run (offline unless wandb.mode=online). Recipes with "
         "`pipeline: optimizer` meta-train a learned optimizer on a training environment instead "
         "(metaopt.optimizer_experiment)."),
        ("resume", cmd_resume, ("run_dir", run_dir_help),
         "continue an interrupted run from its last checkpoints",
         "Continue training every learner of a run folder from its latest checkpoint (same episodes, same "
         "optimiser state), then compare. A finished learner is not trained again."),
        ("compare", cmd_compare, ("run_dir", run_dir_help),
         "re-run the comparison of a finished run",
         "Load a run's trained learners from their checkpoints and compare all learners again, e.g. on more "
         "tasks or other support sizes (compare.* overrides)."),
    ]
    for name, func, (arg, arg_help), summary, description in commands:
        p = sub.add_parser(name, help=summary, description=description)
        p.add_argument(arg, help=arg_help)
        p.add_argument("overrides", nargs="*", help=overrides_help)
        p.set_defaults(func=func)

    p = sub.add_parser("recipes", help="list the bundled recipes with their descriptions",
                       description="List the recipes (one YAML file per experiment: data, learners, training, "
                                   f"comparison) found in ./recipes and {RECIPE_DIR}, each with its one-line "
                                   "description. Run one with `metaopt run NAME`; override any key with key=value.")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("bench", help="run the performance benchmarks (JSON to benchmarks/results/)",
                       description="Time metaopt's hot paths against the reference a user would otherwise use "
                                   "(a per-task loop, torch.optim, higher, learn2learn), in the same run, and "
                                   "write each benchmark's timings and ratios to benchmarks/results/<name>.json.")
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # large activations reuse freed memory instead of fresh pages (metaopt/allocator.py)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"metaopt: error: {error}", file=sys.stderr)
        return 2
    except DivergenceError as error:
        print(f"metaopt: training diverged: {error}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt as error:
        print(f"metaopt: {error or 'interrupted'}; continue with `metaopt resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
