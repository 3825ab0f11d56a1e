"""The implicit-vs-explicit analysis: exact on identical learners, right on pairs with known answers."""

import json
from dataclasses import asdict

import pytest
import torch

from metaopt.analysis import (
    align_scales,
    best_gd,
    dual_form_linear_attention,
    dual_form_scores,
    finetune_keys_values,
    gd_construction,
    icl_vs_finetuning,
    interpolation_losses,
    key_value_parameters,
    parse_analyses,
    probe_inputs,
    probe_predictions,
    query_sensitivities,
    sensitivity_similarity,
    spd_ilwd,
    split_prompts,
    trace,
    untrained_copy,
)
from metaopt.analysis.tracking import sensitivity_references
from metaopt.compare import analysis_value, compare, format_table, plot_similarity
from metaopt.episodes import Episode
from metaopt.learners import (
    Capability,
    DecisionTreeBaseline,
    GradientDescent,
    LeastSquares,
    Learner,
    LinearSelfAttention,
    Ridge,
    Transformer,
)
from metaopt.tasks import LinearRegression

SIZES = [0, 1, 3, 6, 10]


def episode(tasks: int = 64, dim: int = 4, support: int = 10, query: int = 2, seed: int = 0) -> Episode:
    ep = LinearRegression(dim).sample(tasks, support, query, generator=torch.Generator().manual_seed(seed))
    return ep.replace(x_support=ep.x_support.double(), y_support=ep.y_support.double(),
                      x_query=ep.x_query.double(), y_query=ep.y_query.double())


class Scaled(Learner):
    """``factor`` times another learner's predictions: same direction, known distance."""

    def __init__(self, inner: Learner, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, episode: Episode) -> torch.Tensor:
        return self.factor * self.inner(episode)


def test_gd_construction_and_gd_are_the_same_learner_for_every_metric():
    ep = episode()
    lsa, gd = LinearSelfAttention.from_gd(4, 0.37).double(), GradientDescent(1, 0.37).double()
    sim = sensitivity_similarity(lsa, gd, ep, SIZES)
    assert sim.cosine == pytest.approx([1.0] * len(SIZES), abs=1e-12)
    assert sim.l2 == pytest.approx([0.0] * len(SIZES), abs=1e-12)
    assert min(sim.norm_a[1:]) > 0.1  # the sensitivities are not trivially zero beyond k = 0
    diff = spd_ilwd(lsa, gd, ep, SIZES, generator=torch.Generator().manual_seed(1))
    assert diff.spd == pytest.approx([0.0] * len(SIZES), abs=1e-20)
    assert diff.ilwd == pytest.approx([0.0] * len(SIZES), abs=1e-20)
    probes = probe_inputs(ep, 16, generator=torch.Generator().manual_seed(1))
    match = best_gd(probe_predictions(lsa, ep, probes, SIZES), ep, probes, SIZES, steps=[1, 2])
    assert match.steps == 1 and match.lr == pytest.approx(0.37, rel=1e-6)
    assert match.lr_per_k == pytest.approx([0.37] * 4, rel=1e-6) and match.support_sizes == SIZES[1:]
    assert match.spd < 1e-16 and match.spd_by_steps[2][1] > 1e-3


def test_best_gd_recovers_step_count_and_size_of_a_two_step_construction():
    ep = episode()
    lsa = LinearSelfAttention.from_gd(4, 0.2, layers=2).double()
    probes = probe_inputs(ep, 16, generator=torch.Generator().manual_seed(2))
    match = best_gd(probe_predictions(lsa, ep, probes, SIZES), ep, probes, SIZES, steps=[1, 2, 3])
    assert match.steps == 2 and match.lr == pytest.approx(0.2, rel=1e-6)


def test_a_scaled_copy_has_cosine_one_and_a_known_distance():
    ep = episode()
    gd = GradientDescent(1, 0.5).double()
    sim = sensitivity_similarity(Scaled(gd, 2.0), gd, ep, SIZES)
    assert sim.cosine == pytest.approx([1.0] * len(SIZES), abs=1e-12)
    assert sim.l2 == pytest.approx(sim.norm_b, rel=1e-12)  # |2s − s| = |s|
    assert sim.norm_a == pytest.approx([2 * n for n in sim.norm_b], rel=1e-12)
    sim = sensitivity_similarity(Scaled(gd, -1.0), gd, ep, [3])
    assert sim.cosine == pytest.approx([-1.0], abs=1e-12)
    # for a linear learner ŷ = x_qᵀ w the sensitivity is w itself
    w = GradientDescent(1, 0.5).double().fit(ep.x_support, ep.y_support)
    s = query_sensitivities(gd, ep, [10])
    torch.testing.assert_close(s[0, :, 0, 0], w[..., 0])
    torch.testing.assert_close(s[0, :, 1, 0], w[..., 0])


def test_ridge_vs_least_squares_spd_and_ilwd_match_closed_forms():
    ep = episode(dim=4)
    ridge, ls = Ridge(0.7), LeastSquares()
    probes = probe_inputs(ep, 12, generator=torch.Generator().manual_seed(3))
    diff = spd_ilwd(ridge, ls, ep, SIZES, num_probes=12, generator=torch.Generator().manual_seed(3))
    for i, k in enumerate(SIZES):
        sub = ep.take_support(k)
        delta = ridge.fit(sub.x_support, sub.y_support) - ls.fit(sub.x_support, sub.y_support)  # [T, D, 1]
        assert diff.ilwd[i] == pytest.approx(delta.pow(2).sum((1, 2)).mean().item(), rel=1e-9, abs=1e-15)
        assert diff.spd[i] == pytest.approx((probes @ delta).pow(2).mean().item(), rel=1e-9, abs=1e-15)
    assert diff.spd[0] == 0.0 and min(diff.ilwd[1:]) > 1e-3


def test_interpolation_toward_its_own_construction_is_flat_and_between_differs():
    ep = episode()
    lsa = LinearSelfAttention(4, layers=1).double()
    construction = gd_construction(lsa, 0.4, 1)
    assert gd_construction(lsa, 0.4, 2) is None and gd_construction(Ridge(), 0.4, 1) is None
    curve = interpolation_losses(lsa, construction, ep, [0.0, 0.5, 1.0])
    assert curve.loss[0] == pytest.approx(lsa.loss(ep).item())
    assert curve.loss[2] == pytest.approx(GradientDescent(1, 0.4).loss(ep).item(), rel=1e-6)
    assert curve.halfway not in (curve.loss[0], curve.loss[2])
    same = interpolation_losses(construction, construction, ep, [0.0, 0.5])
    assert same.loss[0] == same.loss[1]
    with pytest.raises(ValueError, match="same architecture"):
        interpolation_losses(lsa, GradientDescent(1, 0.4), ep)


def test_align_scales_keeps_the_function_and_undoes_a_rescaling():
    ep = episode()
    construction = LinearSelfAttention.from_gd(4, 0.4).double()
    rescaled = LinearSelfAttention(4).double()
    with torch.no_grad():
        rescaled.pv.copy_(-3.0 * construction.pv)
        rescaled.kq.copy_(construction.kq / -3.0)
    torch.testing.assert_close(rescaled(ep), construction(ep))
    raw = interpolation_losses(rescaled, construction, ep, [0.0, 0.5])
    assert raw.loss[1] > 1.5 * raw.loss[0]  # the straight line leaves the solution...
    aligned = align_scales(rescaled, construction)
    torch.testing.assert_close(aligned(ep), rescaled(ep))
    torch.testing.assert_close(aligned.pv, construction.pv)  # ...which the alignment undoes
    flat = interpolation_losses(aligned, construction, ep, [0.0, 0.5])
    assert flat.loss[1] == pytest.approx(flat.loss[0], rel=1e-9)


def test_dual_form_identity_holds_for_linear_attention():
    g = torch.Generator().manual_seed(0)
    w_q, w_k, w_v = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    demos = torch.randn(3, 6, 7, generator=g, dtype=torch.float64)
    shared = torch.randn(3, 2, 7, generator=g, dtype=torch.float64)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64)
    form = dual_form_linear_attention(w_q, w_k, w_v, demos, shared, x)
    torch.testing.assert_close(form.attention, form.zero_shot + form.update, rtol=1e-12, atol=1e-12)
    explicit = sum(torch.outer(w_v @ d, w_k @ d) for d in demos[0])
    torch.testing.assert_close(form.delta_w[0], explicit)
    assert form.update.abs().min() > 0


def small_transformer() -> Transformer:
    torch.manual_seed(123)
    return Transformer(3, 8, n_embd=16, n_layer=2, n_head=2)


def test_finetuning_changes_only_keys_and_values_and_changes_the_query_prediction():
    model = small_transformer()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ep = LinearRegression(3).sample(4, 6, 2, generator=torch.Generator().manual_seed(1))
    prompts = split_prompts(ep, 4, 1)
    key_value = finetune_keys_values(model, prompts, lr=0.5)
    for name, p in model.named_parameters():  # the model itself is untouched
        assert torch.equal(p, before[name])
    base = key_value_parameters(model)
    assert set(key_value) == {f"blocks.{i}.attn.qkv.{w}" for i in range(2) for w in ("weight", "bias")}
    for name, updated in key_value.items():
        assert updated.shape == (4, *base[name].shape)
        assert (updated - base[name]).abs().amax() > 1e-4  # keys and values moved, per task
    assert not torch.allclose(key_value["blocks.0.attn.qkv.weight"][0], key_value["blocks.0.attn.qkv.weight"][1])
    zero_shot = trace(model, prompts.zero_shot, 1)
    finetuned = trace(model, prompts.zero_shot, 1, key_value)
    assert (finetuned.predictions - zero_shot.predictions).abs().amax() > 1e-4
    # the query rows (W_Q) were never part of the update: zero key/value steps give the zero-shot model back
    unchanged = trace(model, prompts.zero_shot, 1, {n: p.expand(4, *p.shape) for n, p in base.items()})
    torch.testing.assert_close(unchanged.predictions, zero_shot.predictions)
    torch.testing.assert_close(unchanged.scores, zero_shot.scores)
    assert zero_shot.outputs.shape == (2, 4, 2, 16) and zero_shot.scores.shape == (2, 4, 2, 2, 3)


def test_finetuning_matches_a_per_task_sgd_loop_on_the_keys_and_values():
    model = small_transformer()
    ep = LinearRegression(3).sample(2, 5, 1, generator=torch.Generator().manual_seed(2))
    prompts = split_prompts(ep, 4, 1)
    key_value = finetune_keys_values(model, prompts, lr=0.3)
    for t in range(2):
        reference = untrained_copy(model)
        reference.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(reference.parameters(), lr=0.3)
        for i in range(4):
            demo = prompts.demonstrations.select_tasks(slice(t, t + 1))
            step = demo.replace(x_query=demo.x_query[:, i:i + 1], y_query=demo.y_query[:, i:i + 1])
            opt.zero_grad()
            torch.nn.functional.mse_loss(reference(step), step.y_query).backward()
            for n, p in reference.named_parameters():  # keep only the key/value rows' gradients
                if ".attn.qkv." in n:
                    p.grad[: p.shape[0] // 3] = 0
                else:
                    p.grad = None
            opt.step()
        for n, p in reference.named_parameters():
            if ".attn.qkv." in n:
                torch.testing.assert_close(p.detach()[p.shape[0] // 3:], key_value[n][t], rtol=1e-4, atol=1e-6)


def test_dai_scores_and_the_untrained_control_run_and_are_in_range():
    model = small_transformer()
    ep = LinearRegression(3).sample(6, 5, 2, generator=torch.Generator().manual_seed(3))
    report = icl_vs_finetuning(model, ep, shared=1, lr=0.5, seed=0)
    assert report.demonstrations == 4 and report.num_tasks == 6
    for scores in (report.trained, report.untrained):
        for values in (scores.sim_aou, scores.sim_aou_random, scores.sim_am, scores.sim_am_zero_shot):
            assert len(values) == 2 and all(-1 <= v <= 1 for v in values)
        assert (scores.rec2ftp is None) == (scores.ft_fixed == 0)
        assert scores.rec2ftp is None or 0 <= scores.rec2ftp <= 1
        for name in ("sim_aou", "sim_aou_random", "sim_am", "sim_am_zero_shot"):  # the layer means claims read
            assert getattr(scores, f"{name}_mean") == pytest.approx(sum(getattr(scores, name)) / 2)
    assert report.untrained.threshold == report.trained.threshold
    entry = {"dual_form": {"transformer": asdict(report)}}
    assert analysis_value(entry, "dual_form/transformer/untrained/sim_am_mean", 5) == report.untrained.sim_am_mean
    # the untrained copy really is another model
    untrained = untrained_copy(model)
    assert not torch.equal(untrained.read_in.weight, model.read_in.weight)
    assert report.untrained.loss_icl != report.trained.loss_icl
    # finetuning with lr = 0 is the zero-shot model: its update is zero and no query is fixed
    frozen = dual_form_scores(model, ep, demonstrations=4, lr=0.0)
    assert frozen.ft_fixed == 0 and frozen.rec2ftp is None and frozen.loss_ft == pytest.approx(frozen.loss_zero_shot)
    assert frozen.sim_am == pytest.approx(frozen.sim_am_zero_shot)
    with pytest.raises(ValueError, match="demonstrations"):
        split_prompts(ep, 5, 1)
    with pytest.raises(ValueError, match="Transformer"):
        key_value_parameters(LinearSelfAttention(3))


def test_analysis_specs_are_checked():
    specs = parse_analyses(["sensitivity", {"name": "best_gd", "steps": [1, 2]}])
    assert specs[1].options["steps"] == [1, 2] and specs[1].options["num_tasks"] == 256
    with pytest.raises(ValueError, match="unknown analysis 'sensitivty'"):
        parse_analyses(["sensitivty"])
    with pytest.raises(ValueError, match="unknown option"):
        parse_analyses([{"name": "spd_ilwd", "probes": 3}])
    with pytest.raises(ValueError, match="twice"):
        parse_analyses(["sensitivity", "sensitivity"])


def test_compare_with_analysis_writes_the_new_fields_and_serialises(tmp_path):
    torch.manual_seed(0)
    learners = {
        "lsa": LinearSelfAttention.from_gd(3, 0.3),
        "transformer": Transformer(3, 6, n_embd=16, n_layer=1, n_head=2),
        "gd": GradientDescent(1, 0.3),
        "ls": LeastSquares(),
    }
    result = compare(learners, LinearRegression(3), support_sizes=[0, 2, 6], num_tasks=24, query=2,
                     bootstrap=50, progress=False,
                     analysis=["sensitivity", "spd_ilwd", {"name": "best_gd", "steps": [1, 2]}, "interpolation",
                               {"name": "dual_form", "num_tasks": 4}])
    a = result.analysis
    assert set(a) == {"sensitivity", "spd_ilwd", "best_gd", "interpolation", "dual_form"}
    assert set(a["sensitivity"]) == {"lsa vs gd", "lsa vs ls", "transformer vs gd", "transformer vs ls"}
    assert a["sensitivity"]["lsa vs gd"]["cosine"] == pytest.approx([1, 1, 1], abs=1e-5)
    assert a["spd_ilwd"]["lsa vs gd"]["spd"] == pytest.approx([0, 0, 0], abs=1e-10)
    assert a["best_gd"]["lsa"]["lr"] == pytest.approx(0.3, rel=1e-4) and set(a["best_gd"]) == {"lsa", "transformer"}
    assert set(a["interpolation"]) == {"lsa"} and a["interpolation"]["lsa"]["lr"] == pytest.approx(0.3, rel=1e-4)
    assert set(a["dual_form"]) == {"transformer"}
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["analysis"]["best_gd"]["lsa"]["steps"] == 1
    table = format_table(result)
    assert "query sensitivity" in table and "SPD / ILWD" in table and "Rec2FTP" in table and "α=0.5" in table
    figure = plot_similarity(result)
    figure.savefig(tmp_path / "a.png")
    assert len(figure.axes) == 3
    plain = compare({"gd": GradientDescent(1, 0.3)}, LinearRegression(3), support_sizes=[2], num_tasks=8,
                    bootstrap=10, progress=False)
    assert plain.analysis == {} and plot_similarity(plain) is None


class OneStep(Learner):
    """An in-context learner written from scratch (no metaopt learner class above it): one GD step from
    w = 0 with a meta-learned step size, ``w = lr · Xᵀy / k``, which is its own exact GD construction."""

    implicit = True
    capabilities = Learner.capabilities | {Capability.GD_CONSTRUCTION}
    gd_steps = 1

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = torch.nn.Parameter(torch.tensor(float(lr)))

    def forward(self, episode: Episode) -> torch.Tensor:
        xs, ys, xq = episode.x_support.flatten(2), episode.y_support.flatten(2), episode.x_query.flatten(2)
        return xq @ (self.lr * xs.transpose(1, 2) @ ys / max(episode.num_support, 1))

    def gd_construction(self, lr: float) -> "OneStep":
        return OneStep(lr).to(self.lr)


class Undeclared(OneStep):
    """The same function without the capability: the analyses that need it leave it out."""

    capabilities = Learner.capabilities


def test_a_new_learner_gets_the_analyses_its_capabilities_qualify_it_for():
    learners = {"mine": OneStep(0.25), "undeclared": Undeclared(0.25), "gd": GradientDescent(1, 0.3),
                "tree": DecisionTreeBaseline()}
    result = compare(learners, LinearRegression(3), support_sizes=[0, 2, 6], num_tasks=16, query=2, bootstrap=10,
                     progress=False, analysis=["sensitivity", "interpolation"])
    a, skipped = result.analysis, result.analysis_skipped
    assert set(a["interpolation"]) == {"mine"}
    assert a["interpolation"]["mine"]["lr"] == pytest.approx(0.25, rel=1e-4) and a["interpolation"]["mine"]["steps"] == 1
    assert a["interpolation"]["mine"]["loss"] == pytest.approx([a["interpolation"]["mine"]["loss"][0]] * 3, rel=1e-5)
    assert "gd_construction" in skipped["interpolation"]["undeclared"] and "tree" not in skipped["interpolation"]
    # both new learners are differentiable in x_query; the scikit-learn tree is not, and is left out, not tried
    assert set(a["sensitivity"]) == {"mine vs gd", "undeclared vs gd"}
    assert a["sensitivity"]["mine vs gd"]["cosine"] == pytest.approx([1, 1, 1], abs=1e-5)
    assert set(skipped["sensitivity"]) == {"tree"} and "query_gradients" in skipped["sensitivity"]["tree"]
    assert "interpolation left out undeclared" in format_table(result)
    json.dumps(result.to_dict())


def test_sensitivity_is_tracked_against_the_fixed_explicit_learners_with_query_gradients():
    learners = {"lsa": LinearSelfAttention(3), "gd": GradientDescent(1, 0.3), "tree": DecisionTreeBaseline(),
                "learned_gd": GradientDescent(1, 0.3, learn_lr=True), "mine": OneStep(0.25)}
    assert set(sensitivity_references(learners["lsa"], learners)) == {"gd"}
    assert set(sensitivity_references(learners["mine"], learners)) == {"gd"}
    assert sensitivity_references(learners["gd"], learners) == {}
