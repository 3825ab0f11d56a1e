"""The ``metaopt`` command: run recipes, resume runs, re-compare, list recipes.

Only the standard library is imported here: torch, omegaconf, the pipeline and the plotting libraries are
imported by the commands that use them, so that ``metaopt --help`` answers at once.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from metaopt.paths import BENCHMARK_DIR, RECIPE_DIR, recipes

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
  metaopt sweep quickstart train.lr=3e-4,1e-3 seed=0,1     4 runs, then the mean over seeds per learner and k
  metaopt report runs/quickstart/sweep-1a2b3c4d runs/quickstart/20261123-101500-000000   side by side

from Python:  metaopt.run("quickstart", ["train.steps=200"]) returns the results (metaopt.log_to_console()
              shows its progress; it does by default where logging is not configured)
"""

KEYS = """top-level keys of every recipe (override any key as key=value; defaults shown):
  name=NAME              the run's name: its folder is OUTPUT_DIR/NAME/<time>/
  output_dir=runs        where run folders are made
  device=cpu             auto | cpu | cuda | cuda:N (auto: CUDA when present)
  precision=fp32         fp32 | bf16 | fp16 (autocast; loss scaling for fp16)
  compile=false          pass the learners' losses through torch.compile where that works
  threads=null           torch threads (null: torch's default; under torchrun shared by the processes)
  seed=0                 the root of the seed plan: every random stream of the run derives from it
  progress=true          progress bars on a terminal, log lines elsewhere; false: neither
  pipeline=episodes      the kind of experiment: episodes | optimizer | trajectories | priming | distillation
  description=TEXT       what `metaopt recipes` shows
  wandb.mode=offline     online | offline (a W&B run in the run folder, no network) | disabled
  wandb.project=metaopt  wandb.entity=null  wandb.tags=[]  wandb.group=null (null: the run's name)

training (episodes recipes): train.steps, train.lr, train.batch_size, ... (recipes/*.yaml show them all)
  train.KEY=VALUE               applies to every learner, also to one with its own train: block
  learners.NAME.train.KEY=VALUE applies to learner NAME only and wins over train.KEY, in any order
  Each learner's resolved steps, learning rate and batch size are logged when the run starts.
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
            config = load(args.recipe, args.overrides)
            return _launch(args, Path(config.output_dir) / config.name)
        load_run(args.run_dir, args.overrides)
        return _launch(args, None)
    recipe = args.recipe if args.command == "run" else None
    result = run(recipe, args.overrides, run_dir=getattr(args, "run_dir", None), **options)
    if _rank() == 0:
        print(result.report)
    return 0


def _launch(args: argparse.Namespace, runs: Path | None) -> int:
    """Start ``args.nproc`` processes of this command on this machine through ``torch.distributed.run``.

    ``runs`` is the folder a new run's folder is made in (None for ``resume`` and ``compare``): the folder that
    appears there is the one a failure message names.
    """
    if "LOCAL_RANK" in os.environ:
        from metaopt.config import ConfigError

        raise ConfigError("--nproc starts torchrun itself; under torchrun leave --nproc out")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from torch.distributed.elastic.multiprocessing.api import SignalException

    target = args.recipe if args.command == "run" else args.run_dir
    command = [*(["-v"] if args.verbose else []), args.command, target, *args.overrides]
    before = _folders(runs)
    try:
        torchrun(["--standalone", "--nproc-per-node", str(args.nproc), "-m", "metaopt", *command])
    except SignalException as error:  # Ctrl-C or a scheduler's SIGTERM reached torchrun
        print(f"metaopt: stopped by signal {error.sigval}; {_continuation(args, _folders(runs) - before)}",
              file=sys.stderr)
        return 130
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        hint = {2: "a setting was refused (see the error above)", 3: "training diverged (see above)"}
        print(f"metaopt: rank {rank} of {args.nproc} failed (exit code {failure.exitcode}); the other processes "
              f"were stopped; {hint.get(failure.exitcode) or _continuation(args, _folders(runs) - before)}",
              file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _folders(parent: Path | None) -> set[Path]:
    return set(parent.iterdir()) if parent is not None and parent.is_dir() else set()


def _continuation(args: argparse.Namespace, made: set[Path]) -> str:
    """How to go on after a distributed command stopped; ``made`` are the run folders it created."""
    if args.command == "compare":
        return f"compare again with `metaopt compare {args.run_dir} --nproc {args.nproc}`"
    folder = args.run_dir if args.command == "resume" else next(iter(made)) if len(made) == 1 else None
    if folder is None:
        return "nothing to resume: no run folder was made" if not made else (
            "continue with `metaopt resume RUN_DIR --nproc N`, RUN_DIR the run folder printed above")
    return f"continue from the last checkpoint with `metaopt resume {folder} --nproc N` (any number of processes)"


def cmd_run(args: argparse.Namespace) -> int:
    return _run(args)


def cmd_resume(args: argparse.Namespace) -> int:
    return _run(args, resume=True)


def cmd_compare(args: argparse.Namespace) -> int:
    from metaopt.wandb_native import fetch_artifact, is_artifact_reference

    if is_artifact_reference(args.run_dir):  # a `model` artifact of a run is a run folder once downloaded
        args.run_dir = str(fetch_artifact(args.run_dir))
    return _run(args, train=False)


def cmd_sweep(args: argparse.Namespace) -> int:
    from metaopt.sweep import SweepPlan, run_sweep, write_wandb_config

    plan = SweepPlan.make(args.recipe, args.overrides, sweep_id=args.id)
    print(f"sweep {plan.sweep_id}: {len(plan.points)} points of {args.recipe} in {plan.folder}")
    if args.wandb:
        from metaopt.pipelines import load

        path = write_wandb_config(plan, method=args.method, metric=args.metric)
        wandb = load(plan.recipe, plan.fixed).wandb
        where = f" --entity {wandb.entity}" if wandb.entity else ""
        print(f"W&B sweep configuration: {path}\n  wandb sweep --project {wandb.project}{where} {path}\n"
              f"  wandb agent {wandb.entity or '<entity>'}/{wandb.project}/<SWEEP_ID printed by wandb sweep>"
              "      (on every machine that should take runs)")
        return 0
    try:
        statuses = run_sweep(plan, workers=args.workers)
    except KeyboardInterrupt:
        print("metaopt: sweep interrupted; run the same `metaopt sweep` command again to continue (finished "
              "points are skipped, unfinished ones resume)", file=sys.stderr)
        return 130
    from metaopt.aggregate import summarise

    for path, status in statuses.items():
        print(f"  {status.split(':')[0]:<9} {path}")
    _, written = summarise(plan.folder)
    print("\n" + written["table"].read_text())
    print("\n".join(f"{what + ':':<7}{path}" for what, path in written.items()))
    print(f"next:  metaopt report {plan.folder}")
    return 1 if any(s.startswith("failed") for s in statuses.values()) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from metaopt.report import make_report

    report = make_report(args.folders, out=args.out)
    print(report.markdown)
    print("\n".join(f"{what}: {path}" for what, path in report.files.items()))
    return 0


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
    if not (BENCHMARK_DIR / "__main__.py").is_file():
        from metaopt.config import ConfigError

        raise ConfigError(f"benchmarks/ ships with the source checkout, not found under {BENCHMARK_DIR.parent}; "
                          "run from a clone")
    sys.path.insert(0, str(BENCHMARK_DIR.parent))
    from benchmarks.__main__ import main as run_benchmarks

    return run_benchmarks([*args.names, "--threads", str(args.threads)])


def benchmarks() -> dict[str, str]:
    """The checkout's benchmarks by name, each with the first line of its docstring (read, not imported)."""
    found = {}
    for path in sorted(BENCHMARK_DIR.glob("bench_*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        found[path.stem.removeprefix("bench_")] = docstring.split("\n\n")[0]
    return found


def _benchmark_list() -> str:
    found = benchmarks()
    if not found:
        return f"benchmarks (not found under {BENCHMARK_DIR.parent}: they ship with the source checkout)"
    width = max(len(name) for name in found) + 2
    lines = [f"  {name.ljust(width)}{_summary(text, 96 - width)}" for name, text in found.items()]
    return "benchmarks:\n" + "\n".join(lines) + "\nexample:  metaopt bench compare maml --threads 4"


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
         "optimiser state), then compare. A finished learner is not trained again; the metric rows logged after "
         "the checkpoint are dropped and logged once."),
        ("compare", cmd_compare, ("run_dir", run_dir_help),
         "re-run the comparison of a finished run",
         "Load a run's trained learners from their checkpoints and compare all learners again, e.g. on more "
         "tasks or other support sizes (compare.* overrides). Writes RUN_DIR/compare/<time>/ (its own config, "
         "results, figures and W&B run); the run's own files are left as they were."),
    ]
    for name, func, (arg, arg_help), summary, description in commands:
        p = sub.add_parser(name, help=summary, description=description, epilog=KEYS,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
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
                                   "write each benchmark's timings and ratios to benchmarks/results/<name>.json.",
                       epilog=_benchmark_list(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "sweep", help="run a grid of overrides (one run per point), then aggregate over seeds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every combination of the values given, each point an ordinary run in\n"
                    "runs/<name>/<sweep-id>/<point>/, then group the points that differ only in seed: per learner\n"
                    "and k the mean over seeds with a 95% bootstrap interval across seeds, and the claims on that\n"
                    "mean (with how many seeds hold them), in sweep.json, sweep.md and figures/.\n"
                    "Started again, the same command skips finished points and resumes unfinished ones.",
        epilog="values:  key=a,b,c   key=range(0,5)  (0..4; range(start,stop,step))   key=choice(a,b)\n"
               "         key=[1,2]  (one list value)   key=x  (every point)\n"
               "examples:\n"
               "  metaopt sweep quickstart train.lr=3e-4,1e-3 seed=0,1 train.steps=300 compare.num_tasks=200\n"
               "  metaopt sweep quickstart seed=range(0,5) --workers 2\n"
               "  metaopt sweep quickstart train.lr=3e-4,1e-3 seed=0,1 --wandb --method grid\n"
               "scale-out: --wandb writes a W&B sweep configuration; `wandb agent` on each machine runs the points")
    p.add_argument("recipe", help="recipe name (see `metaopt recipes`) or path to a YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUES", help="swept keys (key=a,b,c) and fixed overrides")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run the points on N local processes, each taking every N-th point (default 1: one "
                        "after the other in this process)")
    p.add_argument("--id", default=None, help="the sweep's folder name (default: sweep-<hash of recipe and "
                                              "arguments>, so the same command continues the same sweep)")
    p.add_argument("--wandb", action="store_true",
                   help="write a W&B sweep configuration (wandb_sweep.yaml) and print the `wandb sweep` / "
                        "`wandb agent` commands instead of running the points here")
    p.add_argument("--method", default="grid", choices=["grid", "random", "bayes"], help="W&B search method")
    p.add_argument("--metric", default=None,
                   help="W&B summary key to optimise (default: compare/<first claim's learner>/<metric>@k=<largest k>)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "report", help="put runs and sweeps side by side (markdown + CSV table, one plot per metric)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare the results of run folders, re-comparisons (RUN/compare/<time>/), sweep folders\n"
                    "(their groups, mean over seeds) or folders holding them, from local files only: one table\n"
                    "(report.md, report.csv) and one plot per metric, learners labelled by run, each run named\n"
                    "by the config keys in which the runs differ.",
        epilog="example:  metaopt report runs/quickstart/sweep-1a2b3c4d runs/quickstart/20261123-101500-000000")
    p.add_argument("folders", nargs="+", help="run, compare, or sweep folders (or folders holding them)")
    p.add_argument("--out", default=None, help="where to write the report (default: FOLDER/report for one folder, "
                                               "runs/reports/<time> for several)")
    p.set_defaults(func=cmd_report)
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
    if getattr(args, "workers", 1) < 1:
        parser.error(f"--workers must be >= 1; got {args.workers}")
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level if _rank() == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt as error:
        print(f"metaopt: {_interrupted(args, error)}", file=sys.stderr)
        return 130
    except Exception as error:
        code = _failure(args, error)
        if code is None:
            raise
        return code


def _loaded(module: str, name: str) -> Any:
    """A class of a module if that module is loaded, else a class nothing is an instance of.

    An exception can only be an instance of a class whose module was imported, so the handlers below never
    import torch or the pipeline to recognise one."""
    return getattr(sys.modules.get(module), name, ())


def _failure(args: argparse.Namespace, error: Exception) -> int | None:
    """Report a known failure and return its exit code (2: a refused setting or file, 1: a failed write,
    3: training diverged); None for any other error, which is raised as it is."""
    if isinstance(error, (_loaded("metaopt.config", "ConfigError"),
                          _loaded("metaopt.checkpoints", "UnsafeCheckpointError"))):
        print(f"metaopt: error: {error}", file=sys.stderr)
        return 2
    if isinstance(error, _loaded("metaopt.checkpoints", "WriteError")):  # a full disk: earlier checkpoints intact
        folder = getattr(args, "run_dir", None) or "RUN_DIR (the run folder printed above)"
        print(f"metaopt: error: {error}; the checkpoints written before are intact: free some space, then "
              f"`metaopt resume {folder}`", file=sys.stderr)
        return 1
    if isinstance(error, _loaded("metaopt.train", "DivergenceError")):
        print(f"metaopt: training diverged: {error}", file=sys.stderr)
        return 3
    return None


def _interrupted(args: argparse.Namespace, error: KeyboardInterrupt) -> str:
    """What Ctrl-C stopped and how to continue, naming the run folder (a run's interruption carries it)."""
    if getattr(error, "path", None) is not None:  # metaopt.pipelines.RunInterrupted: its message says it all
        return str(error)
    if args.command == "resume":
        return f"interrupted; continue with `metaopt resume {args.run_dir}`"
    if args.command in ("run", "compare"):
        return "interrupted before the run folder was made; nothing was written"
    return str(error) or "interrupted"


if __name__ == "__main__":
    sys.exit(main())
