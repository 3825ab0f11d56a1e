"""The benchmarks' own checks at tiny sizes (a benchmark must never stop on a correct implementation), their FLOP
and memory counters, the growth fits of the cost curves, and the quick runs that ``make bench`` relies on."""

from __future__ import annotations

import importlib.util
import json
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import (bench_compare, bench_curves, bench_hypertransformer, bench_maml, bench_optimizers,
                        bench_transformer)
from benchmarks.__main__ import main as benchmarks
from benchmarks.flops import achieved, count_flops, machine_rate, pointwise_flops
from benchmarks.memory import peak_saved_mib, saved_megabytes
from benchmarks.trainers import recipe_learner
from metaopt.episodes import Episode
from metaopt.learners import LeastSquares, Ridge, Transformer
from metaopt.learners.maml import conv4
from metaopt.learners.mlp import mlp
from metaopt.runtime import compile_loss
from metaopt.tasks import FewShotImages, Glyphs, LinearRegression, Sinusoid

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers (the bench extra) is not installed")


# ---------------------------------------------------------------------- the benchmarks' checks, tiny
def test_maml_meta_gradients_match_higher_in_float64_for_every_strategy():
    torch.manual_seed(0)
    episode = Sinusoid().sample(3, 4, 4, generator=torch.Generator().manual_seed(0))
    bench_maml.check_meta_gradients(mlp(1, (8,), 1), episode, ["batched", "vmap", "loop"], tolerance=1e-9)
    x, y = torch.randn(2, 6, 1, 16, 16), torch.arange(2).repeat(2, 3)
    images = Episode(x[:, :2], y[:, :2], x[:, 2:], y[:, 2:], kind="classification", num_classes=2)
    bench_maml.check_meta_gradients(conv4(1, 4, 2, image_size=16), images, ["folded", "loop", "batched"],
                                    tolerance=1e-9)


def test_maml_check_refuses_a_wrong_meta_gradient(monkeypatch):
    episode = Sinusoid().sample(2, 4, 4, generator=torch.Generator().manual_seed(0))
    higher = bench_maml.higher_step
    monkeypatch.setattr(bench_maml, "higher_step",
                        lambda model, ep, steps=bench_maml.INNER_STEPS: [1.001 * g for g in higher(model, ep, steps)])
    with pytest.raises(AssertionError, match="batched vs higher"):
        bench_maml.check_meta_gradients(mlp(1, (8,), 1), episode, ["batched"], tolerance=1e-9)


def test_maml_compiled_meta_step_is_checked_against_higher(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(bench_maml, "compile_loss", partial(compile_loss, backend="aot_eager"))  # no C++ compiler
    episode = Sinusoid().sample(2, 4, 4, generator=torch.Generator().manual_seed(0))
    assert bench_maml.check_meta_gradients(mlp(1, (8,), 1), episode, [], tolerance=1e-9, compiled=True)
    higher = bench_maml.higher_step
    monkeypatch.setattr(bench_maml, "higher_step",
                        lambda model, ep, steps=bench_maml.INNER_STEPS: [1.001 * g for g in higher(model, ep, steps)])
    with pytest.raises(AssertionError, match="compiled vs higher"):
        bench_maml.check_meta_gradients(mlp(1, (8,), 1), episode, [], tolerance=1e-9, compiled=True)


def test_maml_compiled_step_that_fell_back_to_eager_is_not_reported_as_compiled(monkeypatch, caplog):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler")

    torch._dynamo.reset()
    monkeypatch.setattr(bench_maml, "compile_loss", partial(compile_loss, backend=failing_backend))
    episode = Sinusoid().sample(2, 4, 4, generator=torch.Generator().manual_seed(0))
    assert not bench_maml.check_meta_gradients(mlp(1, (8,), 1), episode, [], tolerance=1e-9, compiled=True)
    assert "runs eagerly" in caplog.text


def test_hypertransformer_pair_states_what_the_target_asks_of_the_arithmetic():
    family = FewShotImages(Glyphs(), ways=5, shots=1, queries=5, split="test")
    episode = family.sample(1, family.support_size, family.query_size, generator=torch.Generator().manual_seed(0))
    row = bench_hypertransformer._pair(episode, 4)
    generate, adapt = row["ht_generate_rate"], row["maml_5_step_adapt_rate"]
    assert generate["gflop"] > 0 and row["flop_ratio"] == pytest.approx(adapt["gflop"] / generate["gflop"])
    needed = row["generate_rate_needed_for_target"]
    # finishing in 1/12 of the adaptation's time: the generator's work at 12 / flop_ratio times MAML's rate
    assert needed["gflop"] == generate["gflop"]
    assert needed["gflops"] == pytest.approx(adapt["gflops"] * 12.0 / row["flop_ratio"])
    assert row["speedup"] == pytest.approx(row["maml_5_step_adapt_s"] / row["ht_generate_s"])


def test_compare_checks_one_pass_and_solvers_in_float64():
    episode = LinearRegression(3).sample(4, 5, 2, generator=torch.Generator().manual_seed(0))
    model = Transformer(3, max_support=5, n_embd=16, n_layer=1, n_head=2).eval()
    with torch.no_grad():
        bench_compare.check_transformer(model, episode, list(range(6)))
    solver_episode = LinearRegression(3, noise_std=0.1).sample(5, 8, 2, generator=torch.Generator().manual_seed(1))
    bench_compare.check_solver(LeastSquares(), solver_episode, lambda x, y: np.linalg.lstsq(x, y, rcond=None)[0])
    bench_compare.check_solver(Ridge(0.5), solver_episode,
                               lambda x, y: np.linalg.solve(x.T @ x + 0.5 * np.eye(x.shape[1]), x.T @ y))
    assert bench_compare.normal_equations_flop(solver_episode) == 5 * (2 * 8 * 9 + 2 * 8 * 3 + 9 + 18 + 2 * 2 * 3)


@needs_transformers
def test_gpt2_reference_with_our_weights_is_our_function():
    """Garg et al.'s model (read-in, GPT2Model on embeddings, read-out) with the quickstart transformer's weights
    and the exact GELU: the same loss and gradients in float64."""
    ours = recipe_learner("quickstart", "transformer")
    episode = LinearRegression(5).sample(3, 11, 1, generator=torch.Generator().manual_seed(0))
    loss = bench_transformer.check_same_function(ours, episode)
    assert loss == pytest.approx(float(ours.loss(episode).detach()), rel=1e-5)
    reference = bench_transformer.GargTransformer.like(ours)
    trained = {n: p.numel() for n, p in reference.named_parameters() if not n.startswith("backbone.wte")}
    assert sum(trained.values()) == sum(p.numel() for p in ours.parameters())
    with pytest.raises(ValueError, match="num_query=2"):
        bench_transformer.episode_tokens(LinearRegression(5).sample(2, 3, 2, generator=torch.Generator()))


@needs_transformers
def test_gpt2_check_refuses_another_function(monkeypatch):
    """The tanh-approximated GELU of Garg et al.'s configuration is another function: the check says so."""
    ours = recipe_learner("quickstart", "transformer")
    episode = LinearRegression(5).sample(2, 11, 1, generator=torch.Generator().manual_seed(0))
    original = bench_transformer.GargTransformer.like
    monkeypatch.setattr(bench_transformer.GargTransformer, "like",
                        classmethod(lambda cls, model, activation: original(model)))
    with pytest.raises(AssertionError):
        bench_transformer.check_same_function(ours, episode)


@needs_transformers
def test_quick_transformer_benchmark_times_both_steps():
    result = bench_transformer.run(quick=True)
    assert result["check"]["same_loss_and_gradients_in_float64_to"] == 1e-10 and result["tokens_per_task"] == 23
    for side in ("ours_trainer_step", "ours_plain_step", "reference_gpt2_step"):
        assert result[side]["step_s"] > 0 and 0 < result[side]["share_of_matmul_rate"]
        assert result[side]["gflop"] == pytest.approx(result["ours_plain_step"]["gflop"], rel=0.01)
    assert result["speedup"] == pytest.approx(result["reference_gpt2_step"]["step_s"]
                                              / result["ours_trainer_step"]["step_s"])


def test_transformer_benchmark_without_transformers_skips_with_a_message(monkeypatch, capsys):
    def missing():
        raise ImportError("transformers is not installed. make bench installs it")

    monkeypatch.setattr(bench_transformer, "import_transformers", missing)
    assert bench_transformer.run(quick=True) == {"skipped": "transformers is not installed. make bench installs it"}
    assert "bench_transformer skipped: transformers is not installed" in capsys.readouterr().err
    monkeypatch.setattr(bench_curves, "import_transformers", missing)
    curves = bench_curves.icl_curves("quick")
    assert curves["icl_step_vs_support"]["series"]["reference_gpt2"] == {"skipped": "transformers is not installed. "
                                                                                    "make bench installs it"}


# ---------------------------------------------------------------------- counters
def test_count_flops_counts_matmuls_and_cpu_attention():
    layer = nn.Linear(8, 4)
    assert count_flops(lambda: layer(torch.randn(3, 8))) == 2 * 3 * 8 * 4
    q = torch.randn(2, 3, 5, 4)  # [B, H, L, D]
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    forward = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask))
    assert forward == 2 * (2 * 2 * 3 * 5 * 5 * 4)  # q kᵀ and (weights) v, dense
    conv = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    x = torch.randn(1, 2, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # torch's native CPU kernel, whose arguments torch's own formula misreads
        native = count_flops(lambda: torch.ops.aten.thnn_conv2d(x, conv.weight, [3, 3], conv.bias, [1, 1], [0, 0]))
    assert native == count_flops(lambda: conv(x)) == 2 * 3 * 2 * 9 * 4 * 4


def test_pointwise_flops_count_elementwise_and_foreach_outputs():
    a, b = torch.randn(10), torch.randn(10)
    assert pointwise_flops(lambda: a * b + 1) == 20
    assert pointwise_flops(lambda: torch._foreach_mul_([a, b.view(2, 5)], 2.0)) == 20


def test_machine_rate_is_measured_once_and_shares_divide_by_it():
    rate = machine_rate()
    assert rate > 0 and machine_rate("cpu") == rate
    assert achieved(2e9, 0.5) == {"gflop": 2.0, "gflops": 4.0, "share_of_matmul_rate": 4.0 / rate}


def test_optimizer_flops_are_counted_on_the_public_ops_and_the_fused_kernels_come_back():
    import optimizers._torch_kernels as kernels

    before = (kernels.FUSED_ADAM.fn, kernels.FUSED_SGD.fn)
    with bench_optimizers._public_ops():
        assert kernels.FUSED_ADAM.fn is None and kernels.FUSED_SGD.fn is None
    assert (kernels.FUSED_ADAM.fn, kernels.FUSED_SGD.fn) == before


def test_saved_memory_counts_distinct_storages_and_the_peak():
    x = torch.randn(256, 256, requires_grad=True)  # 256 KiB

    def two_graphs():
        (x * x).sum().backward()  # saves x (twice, one storage); freed by its backward
        (x.exp() * 2).sum().backward()  # saves exp(x) only

    assert saved_megabytes(two_graphs) == pytest.approx(0.5, rel=1e-3)  # and the scalar 2, a few bytes
    assert peak_saved_mib(two_graphs) == pytest.approx(0.25, rel=1e-3)


# ---------------------------------------------------------------------- cost curves
def test_exponent_of_a_power_law_and_its_growth_in_words():
    sizes = [1, 2, 4, 8, 16]
    assert bench_curves.exponent(sizes, [3 * s**1.5 for s in sizes]) == pytest.approx(1.5)
    assert bench_curves.exponent(sizes, [0.0, 1, 2, 3, 4]) is None
    assert [bench_curves.growth(e) for e in (0.05, 0.5, 1.0, 1.5, 2.0, 3.0, None)] == [
        "constant", "sublinear", "linear", "superlinear", "quadratic", "faster than quadratic", "unknown"]
    assert bench_curves.series(sizes, [1.0] * 5, sizes) == {
        "values": [1.0] * 5, "exponent": pytest.approx(0.0, abs=1e-12), "growth": "constant",
        "expected_exponent": pytest.approx(1.0), "expected_growth": "linear"}


def test_quick_curves_write_json_and_figure(tmp_path, capsys):
    assert benchmarks(["curves", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "curves.json").read_text())
    assert set(result["curves"]) == {"icl_step_vs_support", "icl_step_vs_dim", "maml_vs_inner_steps",
                                     "maml_vs_meta_batch", "unroll_memory_vs_length", "ht_generation_vs_episodes"}
    for curve in result["curves"].values():
        for s in curve["series"].values():
            if "skipped" not in s:
                assert len(s["values"]) == len(curve["sizes"]) and s["exponent"] is not None
                assert s["growth"] != "unknown" and s["expected_exponent"] is not None
    memory = result["curves"]["unroll_memory_vs_length"]["series"]
    assert memory["full"]["exponent"] == pytest.approx(1.0, abs=0.05)
    assert memory["es_4_pairs"]["expected_exponent"] == pytest.approx(0.0, abs=1e-9)
    assert {"ours", "higher"} <= set(result["curves"]["maml_vs_meta_batch"]["series"])
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and result["machine"]["matmul_gflops_fp32"] > 0
    assert "unroll_memory_vs_length / full: size^1.00 (linear); expected size^1.00 (linear)" in capsys.readouterr().out
