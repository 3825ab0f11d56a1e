import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metaopt.cli import main
from metaopt.config import RECIPE_DIR
from metaopt.pipelines import build, load
from metaopt.testing import TINY


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def only_run_dir(root: Path) -> Path:
    (run_dir,) = (root / "tiny").iterdir()
    return run_dir


def test_run_writes_results_plot_metrics_and_offline_wandb(recipe, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", str(recipe), f"output_dir={out}", "wandb.mode=offline"]) == 0
    run_dir = only_run_dir(out)
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["curves"]) == {"transformer", "least_squares", "gd"}
    assert results["support_sizes"] == [0, 2, 4] and results["claims"][0]["holds"] is True
    assert (run_dir / "figures" / "normalized_error_vs_k.png").stat().st_size > 1000
    assert any("transformer/loss" in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert (run_dir / "checkpoints" / "transformer" / "step_00000006.pt").exists()
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run folder"
    printed = capsys.readouterr().out
    assert "normalized_error" in printed and "transformer vs least_squares" in printed


def test_resume_continues_an_interrupted_run_and_compare_reuses_it(recipe, tmp_path):
    out = tmp_path / "runs"
    assert main(["run", str(recipe), f"output_dir={out}", "wandb.mode=disabled"]) == 0
    run_dir = only_run_dir(out)
    (run_dir / "checkpoints" / "transformer" / "step_00000006.pt").unlink()
    assert main(["resume", str(run_dir)]) == 0
    assert (run_dir / "checkpoints" / "transformer" / "step_00000006.pt").exists()
    record = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["compare", str(run_dir), "compare.num_tasks=64"]) == 0
    (again,) = (run_dir / "compare").iterdir()  # a re-comparison has its own folder, config and results
    assert json.loads((again / "results.json").read_text())["num_tasks"] == 64
    assert "num_tasks: 64" in (again / "config.yaml").read_text()
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and again not in p.parents} == record
    assert json.loads((run_dir / "results.json").read_text())["num_tasks"] == 32


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.stepz=5", "stepz"),
        ("train.steps=many", "train.steps"),
        ("wandb.mode=sometimes", "wandb.mode='sometimes' is not allowed"),
        ("learners.transformer.depth=3", "unknown argument(s) ['depth'] for Transformer"),
        ("task._target_=metaopt.tasks.Nope", "cannot be imported"),
        ("notakeyvalue", "must look like key=value"),
        ("train.curriculum.support.end=9", "curriculum.support.end (9) must equal support (4)"),
        ("train.schedule=linear", "train.schedule='linear' is not allowed"),
        ("compare.analysis=[sensitivty]", "compare.analysis: compare analysis: unknown analysis 'sensitivty'"),
        ("evaluate=[{_target_: json.dumps}]", "evaluate[0]: json.dumps needs ['obj']"),
        ("compare.task={_target_: metaopt.tasks.Conjunction, n_bits: 2}", "compare.task gives 'binary' episodes"),
        ("claims=[{learner: least_squares, k: 2, better_than: [ridge]}]",
         "claims[0].better_than[0]='ridge' is not one of the learners"),
        ("claims.0.k=4", "override 'claims.0.k=4' does not fit the recipe"),
    ],
)
def test_bad_overrides_fail_before_any_work_naming_the_key(recipe, tmp_path, capsys, override, fragment):
    out = tmp_path / "runs"
    assert main(["run", str(recipe), f"output_dir={out}", override]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists(), "a run folder was created before the config was validated"


def test_missing_recipe_and_missing_run_folder(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["resume", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_recipes_lists_bundled_recipes(capsys):
    assert main(["recipes"]) == 0
    assert "quickstart" in capsys.readouterr().out


def test_recipes_are_listed_without_loading_torch():
    code = ("import sys\nfrom metaopt.cli import main\nassert main(['recipes']) == 0\n"
            "heavy = ('sklearn', 'scipy', 'matplotlib', 'torch', 'omegaconf', 'wandb')\n"
            "print('loaded:', *[name for name in heavy if name in sys.modules], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "quickstart" in result.stdout
    assert result.stderr.strip() == "loaded:"


def test_recipes_lists_a_broken_local_recipe_with_what_is_wrong(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "broken.yaml").write_text("name: [unclosed\n")
    (tmp_path / "recipes" / "listing.yaml").write_text("- a\n- b\n")
    (tmp_path / "recipes" / "mine.yaml").write_text("name: mine\ndescription: my own recipe\n")
    assert main(["recipes"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "not readable as YAML" in lines["broken"] and "not a YAML mapping" in lines["listing"]
    assert lines["mine"].endswith("my own recipe") and "quickstart" in lines


FIXTURE_OVERRIDES = {  # the fixture: 3 background alphabets, 4 drawings per character
    "omniglot": ["task.source.val_alphabets=1", "task.queries=2", "train.query=10", "compare.query=10"],
}


@pytest.mark.parametrize("recipe_path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_recipe_loads_and_builds(recipe_path, omniglot_root, monkeypatch):
    monkeypatch.setenv("OMNIGLOT_ROOT", str(omniglot_root))  # recipes for data on disk read it from there
    config = load(str(recipe_path), FIXTURE_OVERRIDES.get(recipe_path.stem, []))
    experiment = build(config)
    assert config.description
    if config.pipeline == "optimizer":
        assert experiment.environments and experiment.learned
        return
    if config.pipeline == "trajectories":
        assert experiment.averagers
        return
    if config.pipeline == "priming":
        assert experiment.facts and len(experiment.corpus)
        return
    if config.pipeline == "distillation":
        assert experiment.graphs
        return
    assert experiment.learners


def test_unknown_pipeline_is_refused(recipe, tmp_path, capsys):
    recipe.write_text("pipeline: quantum\n" + recipe.read_text())
    assert main(["run", str(recipe), f"output_dir={tmp_path}"]) == 2
    assert "pipeline='quantum' is not allowed" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["run"], ["resume"], ["compare"], ["recipes"], ["bench"]])
def test_help_explains_every_subcommand(command):
    result = subprocess.run([sys.executable, "-m", "metaopt.cli", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage: metaopt" in result.stdout and len(result.stdout) > 200


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "metaopt"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "resume" in result.stdout


def test_nested_targets_are_built_and_checked():
    from metaopt.config import ConfigError, instantiate

    family = instantiate({"_target_": "metaopt.tasks.FewShotImages", "source": {"_target_": "metaopt.tasks.Digits"},
                          "ways": 3, "shots": 1, "queries": 2}, "task")
    assert type(family.source).__name__ != "dict"
    with pytest.raises(ConfigError, match=r"task.source: unknown argument\(s\) \['colour'\]"):
        instantiate({"_target_": "metaopt.tasks.FewShotImages", "ways": 3, "shots": 1, "queries": 2,
                     "source": {"_target_": "metaopt.tasks.Digits", "colour": 1}}, "task")


def test_non_string_learner_name_is_explained(recipe, tmp_path, capsys):
    text = recipe.read_text().replace("least_squares:", "null:", 1)
    recipe.write_text(text.replace("learner: least_squares", "learner: gd"))
    assert main(["run", str(recipe), f"output_dir={tmp_path}"]) == 2
    assert "quote it" in capsys.readouterr().err


def test_compare_task_overrides_change_only_the_evaluation_family(recipe, tmp_path):
    out = tmp_path / "runs"
    assert main(["run", str(recipe), f"output_dir={out}", "wandb.mode=disabled", "train.steps=1",
                 "compare.task={noise_std: 3.0}", "claims=[]"]) == 0
    results = json.loads((only_run_dir(out) / "results.json").read_text())
    noisy_least_squares = results["curves"]["least_squares"]["mean"][-1]
    assert noisy_least_squares > 0.5  # exact without noise (see the claim in TINY), far from it with σ=3


def test_sensitivity_is_tracked_during_training_when_asked(recipe, tmp_path):
    out = tmp_path / "runs"
    assert main(["run", str(recipe), f"output_dir={out}", "wandb.mode=disabled", "compare.analysis=[sensitivity]"]) == 0
    run_dir = only_run_dir(out)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tracked = [row for row in rows if "transformer/sensitivity_cosine/least_squares" in row]
    assert [row["transformer/step"] for row in tracked] == [3, 6]  # at every validation
    assert all(-1 <= row["transformer/sensitivity_cosine/gd"] <= 1 for row in tracked)
    assert (run_dir / "figures" / "sensitivity_vs_step_transformer.png").stat().st_size > 1000
    assert (run_dir / "figures" / "analysis_vs_k.png").exists()


def test_omniglot_recipe_runs_on_a_folder_in_the_omniglot_layout(omniglot_root, tmp_path):
    out = tmp_path / "runs"
    assert main(["run", "omniglot", f"task.source.root={omniglot_root}", "task.source.val_alphabets=1",
                 "task.queries=2", "train.query=10", "compare.query=10", "train.steps=2", "train.batch_size=2",
                 "train.val_tasks=2", "learners.maml.train.steps=1", "compare.num_tasks=4", "compare.bootstrap=10",
                 "wandb.mode=disabled", "progress=false", f"output_dir={out}"]) == 0
    (run_dir,) = (out / "omniglot").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["curves"]) == {"ht_all_layers", "protonet", "maml"} and results["metric"] == "accuracy"


def test_missing_omniglot_folder_names_the_layout(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMNIGLOT_ROOT", str(tmp_path / "nowhere"))
    assert main(["run", "omniglot", f"output_dir={tmp_path}"]) == 2
    assert "images_background" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["run"], ["bench"]])
def test_help_loads_neither_torch_nor_scikit_learn_scipy_or_matplotlib(command):
    code = ("import sys\nfrom metaopt.cli import main\ntry:\n    main([*sys.argv[1:], '--help'])\nexcept SystemExit:\n"
            "    pass\nheavy = ('sklearn', 'scipy', 'matplotlib', 'torch', 'omegaconf', 'wandb')\n"
            "print('loaded:', *[name for name in heavy if name in sys.modules], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: metaopt" in result.stdout
    assert result.stderr.strip() == "loaded:"


def help_text(*command: str) -> str:
    result = subprocess.run([sys.executable, "-m", "metaopt", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    return result.stdout


def test_run_help_lists_every_top_level_key_with_its_default_and_the_override_rule():
    from metaopt.config import CommonSettings
    from metaopt.log import WandbSettings
    from metaopt.pipelines import PIPELINES

    text = help_text("run")
    shown = dict(re.findall(r"(?<![\w.])([a-z_]+(?:\.[a-z_]+)?)=(\S+)", text.split("top-level keys")[1]))
    fields = {f.name: f.default for f in dataclasses.fields(CommonSettings) if f.name != "wandb"}
    fields |= {f"wandb.{f.name}": f.default if f.default is not dataclasses.MISSING else f.default_factory()
               for f in dataclasses.fields(WandbSettings)}
    assert set(fields) <= set(shown), f"not in `metaopt run --help`: {sorted(set(fields) - set(shown))}"
    for key, default in fields.items():
        if not shown[key].isupper():  # NAME, TEXT: the recipe's own
            assert shown[key] == json.dumps(default).strip('"'), key
    assert all(kind in text for kind in PIPELINES)
    assert "learners.NAME.train.KEY=VALUE applies to learner NAME only and wins over train.KEY" in text
    assert "train.KEY=VALUE" in help_text("resume") and "output_dir=runs" in help_text("compare")


def test_bench_help_lists_the_benchmarks():
    from metaopt.paths import BENCHMARK_DIR

    text = help_text("bench")
    names = [path.stem.removeprefix("bench_") for path in BENCHMARK_DIR.glob("bench_*.py")]
    assert names and all(re.search(rf"^  {name} +\S", text, re.MULTILINE) for name in names)


def test_ctrl_c_names_the_run_folder_and_resume_finishes_it(recipe, tmp_path, capsys, monkeypatch):
    from metaopt.train import MetaTrainer

    step = MetaTrainer._train_step

    def interrupted_at_step_4(self):
        if self.step == 4:
            raise KeyboardInterrupt
        step(self)

    monkeypatch.setattr(MetaTrainer, "_train_step", interrupted_at_step_4)
    out = tmp_path / "runs"
    assert main(["run", str(recipe), f"output_dir={out}", "wandb.mode=disabled"]) == 130
    run_dir = only_run_dir(out)
    err = capsys.readouterr().err
    assert f"checkpoint saved to {run_dir / 'checkpoints' / 'transformer' / 'step_00000004.pt'}" in err
    assert f"continue with `metaopt resume {run_dir}`" in err and "RUN_DIR" not in err
    monkeypatch.undo()
    assert main(["resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "results.json").read_text())["claims"][0]["holds"] is True


def test_a_stopped_distributed_command_names_the_folder_to_continue(tmp_path):
    from metaopt.cli import _continuation, build_parser

    made = tmp_path / "runs" / "quickstart" / "20261123-101500-000000"
    run = build_parser().parse_args(["run", "quickstart", "--nproc", "2"])
    assert f"`metaopt resume {made} --nproc N`" in _continuation(run, {made})
    assert "nothing to resume" in _continuation(run, set())
    assert "RUN_DIR the run folder printed above" in _continuation(run, {made, made.with_name("other")})
    resume = build_parser().parse_args(["resume", str(made), "--nproc", "2"])
    assert f"`metaopt resume {made} --nproc N`" in _continuation(resume, set())
    compare = build_parser().parse_args(["compare", str(made), "--nproc", "2"])
    assert _continuation(compare, set()) == f"compare again with `metaopt compare {made} --nproc 2`"
