"""The ``metaopt`` command: run recipes, resume runs, re-compare, list recipes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from metaopt.config import RECIPE_DIR, ConfigError, recipes

logger = logging.getLogger("metaopt")

EPILOG = """examples:
  metaopt recipes                                  list the bundled recipes
  metaopt run quickstart                           meta-train and compare (W&B offline)
  metaopt run quickstart train.steps=200 wandb.mode=disabled
  metaopt run quickstart --nproc 2                 the same run on 2 processes (torch.distributed)
  torchrun --nproc-per-node 2 -m metaopt run quickstart     the same, launched by torchrun yourself
  metaopt resume runs/quickstart/20261123-101500-000000
  metaopt compare runs/quickstart/20261123-101500-000000 compare.num_tasks=4000
  metaopt bench compare                            time a hot path against its reference

from Python:  metaopt.run("quickstart", ["train.steps=200"]) returns the results
"""


# ---------------------------------------------------------------------- subcommands
# The pipeline (torch, the learners, matplotlib) is imported only by the commands that run one, so that
# `--help` and `recipes` answer at once.
def _rank() -> int:
    """This process's rank under torchrun (0 otherwise); only rank 0 prints reports and progress."""
    return int(os.environ.get("RANK", "0"))


def _run(args: argparse.Namespace, **options: object) -> int:
    from metaopt.pipelines import load, load_run, run

    if args.nproc > 1:
        # check the recipe here, before any process starts, so bad input fails once and at once
        if args.command == "run":
            load(args.recipe, args.overrides)
        else:
            load_run(args.run_dir, args.overrides)
        return _launch(args)
    recipe = args.recipe if args.command == "run" else None
    result = run(recipe, args.overrides, run_dir=getattr(args, "run_dir", None), **options)
    if _rank() == 0:
        print(result.report)
    return 0


def _launch(args: argparse.Namespace) -> int:
    """Start ``args.nproc`` processes of this command on this machine through ``torch.distributed.run``."""
    if "LOCAL_RANK" in os.environ:
        raise ConfigError("--nproc starts torchrun itself; under torchrun leave --nproc out")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from torch.distributed.elastic.multiprocessing.api import SignalException

    target = args.recipe if args.command == "run" else args.run_dir
    command = [*(["-v"] if args.verbose else []), args.command, target, *args.overrides]
    resume = ("continue from the last checkpoint with `metaopt resume RUN_DIR --nproc N` (any number of "
              "processes; the run folder is printed above)")
    try:
        torchrun(["--standalone", "--nproc-per-node", str(args.nproc), "-m", "metaopt", *command])
    except SignalException as error:  # Ctrl-C or a scheduler's SIGTERM reached torchrun
        print(f"metaopt: stopped by signal {error.sigval}; {resume}", file=sys.stderr)
        return 130
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        hint = {2: "a setting was refused (see the error above)", 3: "training diverged (see above)"}
        print(f"metaopt: rank {rank} of {args.nproc} failed (exit code {failure.exitcode}); the other processes "
              f"were stopped; {hint.get(failure.exitcode, resume)}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _run(args)


def cmd_resume(args: argparse.Namespace) -> int:
    return _run(args, resume=True)


def cmd_compare(args: argparse.Namespace) -> int:
    return _run(args, train=False)


def _summary(description: str, width: int = 100) -> str:
    """A recipe's description on one line, cut to ``width`` characters."""
    text = " ".join(description.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_recipes(args: argparse.Namespace) -> int:
    del args
    found = recipes()
    width = max((len(name) for name in found), default=0) + 2
    for name, description in found.items():
        print(f"{name.ljust(width)}{_summary(description)}")
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
         "`pipeline: optimizer` meta-train learned optimizers on training environments instead "
         "(metaopt.pipelines.optimizer). The same as metaopt.run(RECIPE, OVERRIDES) in Python."),
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
        p.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="run on N processes of this machine through torch.distributed (gloo on CPU, nccl on "
                            "CUDA; the same as `torchrun --nproc-per-node N -m metaopt ...`; default 1)")
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
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow an option (`run quickstart --nproc 2 train.steps=100`)
    if extra and hasattr(args, "overrides") and not any(item.startswith("-") for item in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "nproc", 1) < 1:
        parser.error(f"--nproc must be >= 1; got {args.nproc}")
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level if _rank() == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"metaopt: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt as error:
        print(f"metaopt: {error or 'interrupted'}; continue with `metaopt resume RUN_DIR`", file=sys.stderr)
        return 130
    except Exception as error:
        from metaopt.train import DivergenceError  # loaded already when training raised it

        if not isinstance(error, DivergenceError):
            raise
        print(f"metaopt: training diverged: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
