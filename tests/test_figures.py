"""The house style of the figures (metaopt.plotting) and its check on every figure a recipe writes.

The suite sets ``METAOPT_CHECK_FIGURES=1`` (conftest), so ``Run.save_figure`` and ``plotting.save`` check every
figure the tests write: each recipe's shrunk run elsewhere in the suite checks its figures there. The recipes no
other test runs are run here, shrunk further (the per-task baselines' own step counts), and a test keeps the list
of where each recipe is run complete.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from metaopt import plotting
from metaopt.aggregate import Group, plot_groups
from metaopt.analysis.nearest_heads import _figure as nearest_heads_figure
from metaopt.cli import main
from metaopt.compare import Comparison, Curve, plot
from metaopt.config import RECIPE_DIR
from metaopt.log import Run
from metaopt.pipelines import load
from metaopt.pipelines.optimizer import _plot_coefficients
from metaopt.testing import shrunk
from hypernets.continual import ContinualResult, chance, plot_result
from test_paper_presets import PRESETS
from test_recipes_smoke import REPRODUCTIONS

KS = list(range(12))


def curve(values, implicit, spread=0.1):
    return Curve(list(values), [v * (1 - spread) for v in values], [v * (1 + spread) for v in values], implicit)


def error_comparison(**curves) -> Comparison:
    return Comparison("normalized_error", True, KS, 200, curves, dimension=5)


def legend_labels(fig) -> set[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    return {text.get_text() for legend in legends for text in legend.get_texts()}


def texts(fig) -> dict[str, str]:
    return {t.get_gid(): t.get_text() for t in fig.texts}


# ---------------------------------------------------------------------- the plotting module, on synthetic data
def test_comparison_plot_has_title_subtitle_labels_and_every_learner_in_the_legend():
    fig = plot(error_comparison(transformer=curve([1 / (k + 1) for k in KS], True),
                                ridge=curve([0.9 / (k + 1) for k in KS], False)), title="quickstart")
    plotting.check_figure(fig)
    assert texts(fig)["metaopt-title"] == "quickstart: normalized error vs k"
    subtitle = texts(fig)["metaopt-subtitle"]
    assert "95%" in subtitle and "200 held-out tasks" in subtitle and "dashed: explicit" in subtitle
    (ax,) = fig.axes
    assert ax.get_xlabel() and ax.get_ylabel() == "normalized error"
    assert {"transformer", "ridge", "k = d = 5"} <= legend_labels(fig)
    styles = {line.get_label(): line.get_linestyle() for line in ax.lines}
    assert styles["transformer"] == "-" and styles["ridge"] == "--"
    assert len(ax.collections) == 2  # one band each


def test_values_beyond_the_clipped_range_are_marked_with_their_value():
    gd = [1.0, 2.49, 1.6, *[0.5 / k for k in KS[3:]]]
    fig = plot(error_comparison(gd=curve(gd, False), ls=curve([max(0.0, 1 - k / 5) for k in KS], False)))
    plotting.check_figure(fig)
    (ax,) = fig.axes
    assert ax.get_ylim()[1] == pytest.approx(plotting.ERROR_CLIP) and ax.get_ylim()[0] == 0
    marks = [line for line in ax.lines if line.get_gid() == "metaopt-clipped"]
    assert len(marks) == 2 and all(line.get_marker() == "^" for line in marks)
    assert {"2.49", "1.6"} <= {t.get_text() for t in ax.texts}
    assert "beyond the axis" in texts(fig)["metaopt-subtitle"]
    silent, (bare,) = plotting.new_figure()
    bare.plot(KS, gd, label="gd")
    bare.set_ylim(0, 1.25)
    bare.set(xlabel="k", ylabel="error")
    plotting.finish(silent, "t", "s")
    with pytest.raises(plotting.FigureStyleError, match="outside the y range with no clipping mark"):
        plotting.check_figure(silent)


def test_identical_series_stay_visible_and_say_so():
    same = [1 / (k + 1) for k in KS]
    fig = plot(error_comparison(gd_best_step=curve(same, False), gd_tuned_step=curve(same, False)))
    plotting.check_figure(fig)
    (ax,) = fig.axes
    best, tuned = plotting_lines = [line for line in ax.lines if line.get_label().startswith("gd_")]
    assert tuned.get_label() == "gd_tuned_step (= gd_best_step)"
    assert tuned.get_markerfacecolor() == "none" and tuned.get_markersize() > best.get_markersize()
    assert tuned.get_zorder() > best.get_zorder()
    assert {line.get_label() for line in plotting_lines} <= legend_labels(fig)


def test_single_points_get_a_marker_and_their_error_bar():
    fig = plot(Comparison("accuracy", False, [5], 8, {"protonet": Curve([0.7], [0.6], [0.8], False),
                                                      "ht": Curve([0.5], [0.45], [0.55], True)}, chance=0.2))
    plotting.check_figure(fig)
    (ax,) = fig.axes
    assert len(ax.containers) == 2  # an error bar each
    points = {line.get_label(): line for line in ax.lines if line.get_label() in ("protonet", "ht")}
    assert all(line.get_marker() not in ("None", None) for line in points.values())
    assert points["protonet"].get_markerfacecolor() == "white"  # explicit: hollow
    assert "error bars" in texts(fig)["metaopt-subtitle"] and "hollow" in texts(fig)["metaopt-subtitle"]
    lonely, (ax,) = plotting.new_figure()
    ax.plot([5], [0.7], label="protonet")
    ax.set(xlabel="k", ylabel="accuracy")
    plotting.finish(lonely, "t", "s")
    with pytest.raises(plotting.FigureStyleError, match="one point and no marker"):
        plotting.check_figure(lonely)


def test_counts_get_integer_ticks():
    for ks in ([0, 1, 2, 5, 10], list(range(0, 41, 3))):
        fig = plot(Comparison("normalized_error", True, ks, 10, {"ls": curve([1 / (k + 1) for k in ks], False)}))
        plotting.check_figure(fig)
        ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        if len(ks) <= 12:
            assert ticks == ks
    fractional, (ax,) = plotting.new_figure()
    ax.plot([0, 1, 2, 3], [1, 2, 3, 4], marker="o", label="steps")
    ax.set_xticks([0, 0.5, 1, 1.5, 2, 2.5, 3])
    ax.set(xlabel="step", ylabel="loss")
    plotting.finish(fractional, "t", "s")
    with pytest.raises(plotting.FigureStyleError, match="non-integer ticks"):
        plotting.check_figure(fractional)


def test_classification_gets_a_chance_line_and_regression_a_line_at_k_equals_d():
    fig = plot(Comparison("accuracy", False, KS, 50, {"t": curve([0.2 + 0.05 * k for k in KS], True)}, chance=0.2))
    (chance_line,) = [line for line in fig.axes[0].lines if line.get_gid() == "metaopt-chance"]
    assert chance_line.get_label() == "chance (1/5)" and chance_line.get_ydata()[0] == pytest.approx(0.2)
    assert plotting.chance_label(0.56) == "chance (majority label, 0.56)"
    fig = plot(error_comparison(ls=curve([max(0.0, 1 - k / 5) for k in KS], False)))
    (d_line,) = [line for line in fig.axes[0].lines if line.get_label() == "k = d = 5"]
    assert list(d_line.get_xdata()) == [5, 5]


def test_log_axes_only_over_more_than_a_decade():
    assert plotting.choose_scale([0.275, 0.286]) == "linear"
    assert plotting.choose_scale([0.01, 1.0]) == "log"
    assert plotting.choose_scale([0.0, 5.0]) == "linear"
    fig = plot(Comparison("adjusted_loss", True, KS, 10, {"t": curve([0.275 + 0.001 * k for k in KS], True)}))
    assert fig.axes[0].get_yscale() == "linear"
    fig = plot(Comparison("adjusted_loss", True, KS, 10, {"t": curve([10.0 ** -k for k in KS], True)}))
    assert fig.axes[0].get_yscale() == "log"
    plotting.check_figure(fig)
    magnified, (ax,) = plotting.new_figure()
    ax.plot([0, 1, 2], [0.275, 0.28, 0.286], marker="o", label="loss")
    ax.set(xlabel="step", ylabel="loss", yscale="log")
    plotting.finish(magnified, "t", "s")
    with pytest.raises(plotting.FigureStyleError, match="log y axis over less than a decade"):
        plotting.check_figure(magnified)


def test_the_check_refuses_missing_titles_labels_empty_panels_and_legends_over_the_data():
    fig = Figure()
    ax, empty = fig.subplots(1, 2)
    ax.plot([0, 1], [0, 1], marker="o", label="a")
    ax.plot([0, 1], [1, 0], marker="s", label="b")
    ax.legend(loc="center")
    with pytest.raises(plotting.FigureStyleError) as error:
        plotting.check_figure(fig)
    message = str(error.value)
    for problem in ("no title", "no subtitle", "panel 1 (untitled): empty", "no x label", "no y label",
                    "legend lies over a panel's data"):
        assert problem in message


def test_coefficient_heat_map_is_centred_at_zero_with_one_shared_labelled_range_and_layer_names():
    steps, layers, directions = 8, ["0 (matrix 64→32)", "1 (matrix 32→5, head)"], ["sgd", "adam", "sign"]
    alphas = torch.rand(steps, len(layers), len(directions)) * torch.tensor([0.02, 1.0, 0.05])  # all positive
    fig = _plot_coefficients(alphas, layers, directions, horizon=4, title="layerwise_mixture")
    plotting.check_figure(fig)
    images = [image for ax in fig.axes for image in ax.images]
    assert len(images) == len(directions)
    assert len({(image.norm.vmin, image.norm.vmax) for image in images}) == 1  # one range for every direction
    norm = images[0].norm
    assert norm.vmin == pytest.approx(-norm.vmax) and norm.vmax == pytest.approx(alphas.max().item())
    bars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(bars) == 1 and "coefficient" in bars[0].get_ylabel()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == layers
    lopsided, (ax,) = plotting.new_figure()
    image = ax.imshow(np.array([[0.1, 0.5], [0.2, 0.9]]), cmap="RdBu_r")
    plotting.colorbar(lopsided, image, ax, "alpha")
    ax.set(xlabel="step", ylabel="layer")
    plotting.finish(lopsided, "t", "s", legend="none")
    with pytest.raises(plotting.FigureStyleError, match="not centred"):
        plotting.check_figure(lopsided)


def test_analysis_continual_sweep_and_attention_figures_keep_the_style():
    from metaopt.analysis.suite import plot_analysis

    pairs = {"lsa vs gd": {"support_sizes": [1, 2, 5], "cosine": [0.2, 0.9, 0.99], "spd": [1e-1, 1e-3, 1e-5]},
             "lsa vs gd_tuned": {"support_sizes": [1, 2, 5], "cosine": [0.2, 0.9, 0.99], "spd": [1e-1, 1e-3, 1e-5]}}
    figure = plot_analysis({"sensitivity": pairs, "spd_ilwd": pairs,
                            "best_gd": {"lsa": {"support_sizes": [1, 2, 5], "lr_per_k": [1e-3] * 3}}}, "lsa_is_gd")
    plotting.check_figure(figure)
    assert figure.axes[1].get_yscale() == "log" and figure.axes[2].get_yscale() == "linear"
    assert "lsa vs gd_tuned (= lsa vs gd)" in legend_labels(figure)
    result = ContinualResult(3, 10, [[0.9, None, None], [0.8, 0.85, None], [0.7, 0.75, 0.8]], 0.75, -0.1)
    figure = plot_result(result, "cht", chance=chance(5, "class_incremental", 3))
    plotting.check_figure(figure)
    assert any(line.get_gid() == "metaopt-chance" for line in figure.axes[1].lines)
    group = Group("lr=0.1", {}, ["0", "1"], ["a", "b"], "accuracy", False, [0, 2, 4], 100,
                  {"t": {"mean": [0.5, 0.7, 0.9], "low": [0.4, 0.6, 0.8], "high": [0.6, 0.8, 1.0], "implicit": True},
                   "null": {"mean": [0.5] * 3, "low": [0.45] * 3, "high": [0.55] * 3, "implicit": False}},
                  [], chance=0.5)
    plotting.check_figure(plot_groups([group, group, group, group], "sweep"))
    ratios = torch.tensor([[0.5, 3.0], [1.0, 1.2]])
    figure = nearest_heads_figure([("frozen_lm", ["blocks.0.attn", "blocks.1.attn"], ratios)], 16, 12)
    plotting.check_figure(figure)
    (image,) = figure.axes[0].images
    assert image.norm.vcenter == 1.0  # chance in the middle of the diverging map
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["blocks.0.attn", "blocks.1.attn"]


def test_saving_through_a_run_checks_the_figure_when_asked(tmp_path, monkeypatch):
    assert os.environ.get(plotting.CHECK_ENV) == "1", "the suite checks every figure it writes (conftest)"
    run = Run("figures", {}, root=tmp_path, wandb_mode="disabled")
    bare = Figure()
    bare.add_subplot().plot([0, 1], [0, 1], label="x")
    with pytest.raises(plotting.FigureStyleError, match="no title"):
        run.save_figure(bare, "bare")
    monkeypatch.delenv(plotting.CHECK_ENV)
    assert run.save_figure(bare, "bare").stat().st_size > 1000


# ---------------------------------------------------------------------- every recipe's figures are checked
ELSEWHERE = {  # recipe: the test module that runs it shrunk (its figures checked through the environment flag)
    **{name: "test_recipes_smoke.py" for name in REPRODUCTIONS},
    **{f"paper/{name}": "test_paper_presets.py" for name in PRESETS},
    "maml_sinusoid": "test_maml.py", "maml_digits": "test_maml.py", "maml_glyphs": "test_maml.py",
    "omniglot": "test_cli.py", "continual_hypertransformer": "test_hypernets.py",
    "decentralized_distillation": "test_distillation.py", "training_trajectories": "test_dynamics.py",
    "knowledge_priming": "test_priming.py", "specialized_optimizer": "test_optimizer_experiment.py",
    "memory_tokens": "test_vit_memory.py", "quickstart": "test_report.py", "hypertransformer": "test_distributed.py",
    "boolean_icl": "test_distributed.py",
}
HERE = ["boolean_sparse_parity", "garg_function_classes", "garg_function_classes_relu", "garg_function_classes_trees",
        "hypertransformer_semisupervised", "hypertransformer_width_sweep", "noisy_regression"]


def test_every_recipe_has_its_figures_checked_by_a_shrunk_run():
    recipes = {p.stem for p in RECIPE_DIR.glob("*.yaml")}
    recipes |= {f"paper/{p.stem}" for p in (RECIPE_DIR / "paper").glob("*.yaml")}
    covered = set(ELSEWHERE) | set(HERE)
    assert recipes - covered == set(), "run these recipes shrunk in a test (HERE, or another test in ELSEWHERE)"
    assert covered - recipes == set()
    for recipe, module in ELSEWHERE.items():
        assert recipe.removeprefix("paper/") in (Path(__file__).parent / module).read_text(), (recipe, module)


def _faster(recipe: str) -> list[str]:
    """The per-task baselines that fit themselves for many steps (an MLP per prefix) take two steps."""
    config = load(recipe)
    return [f"learners.{name}.steps=2" for name, spec in config.learners.items()
            if isinstance(spec.get("steps"), int) and spec.steps > 10 and "train" not in spec]


@pytest.mark.parametrize("recipe", HERE)
def test_recipe_figures_keep_the_house_style(recipe, tmp_path):
    assert main(["run", recipe, f"output_dir={tmp_path}", *shrunk(recipe), *_faster(recipe)]) == 0
    (run_dir,) = (tmp_path / load(recipe).name).iterdir()
    figures = sorted((run_dir / "figures").glob("*.png"))
    results = json.loads((run_dir / "results.json").read_text())
    assert f"{results['metric']}_vs_k.png" in {f.name for f in figures}
