import pytest
import torch

from metaopt.learners import GradientDescent, Transformer
from metaopt.log import Run
from metaopt.tasks import LinearRegression
from metaopt.train import DivergenceError, MetaTrainer


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return Transformer(x_dim=2, max_support=5, n_embd=16, n_layer=1, n_head=2)


def trainer(run=None, learner=None, **kwargs):
    settings = dict(steps=10, batch_size=16, support=5, query=1, lr=3e-3, val_every=5, val_tasks=32,
                    checkpoint_every=5, log_every=1, seed=0, run=run, progress=False, name="tf")
    settings.update(kwargs)
    return MetaTrainer(learner or tiny_transformer(), LinearRegression(2), **settings)


def test_training_lowers_the_validation_loss():
    """A small transformer learns 1-d regression in context: well below the prior's loss."""
    torch.manual_seed(0)
    learner = Transformer(x_dim=1, max_support=5, n_embd=32, n_layer=2, n_head=2)
    t = MetaTrainer(learner, LinearRegression(1), steps=200, batch_size=128, support=5, lr=3e-3, warmup_steps=20,
                    val_every=200, val_tasks=256, progress=False)
    before = t.validate()
    result = t.fit()
    assert result.steps == 200
    assert result.val_loss < 0.6 * before


def test_gd_step_size_is_meta_learned():
    """A learnable GD step size moves from a poor value toward the best one-step size."""
    gd = GradientDescent(steps=1, lr=0.01, learn_lr=True)
    t = MetaTrainer(gd, LinearRegression(4), steps=60, batch_size=64, support=20, lr=0.05, seed=0,
                    progress=False, val_every=60)
    before = t.validate()
    t.fit()
    assert gd.lr.item() > 0.3 and t.validate() < before


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = trainer(run=Run("a", {}, root=tmp_path, wandb_mode="disabled"))
    straight.fit()

    run = Run("b", {}, root=tmp_path, wandb_mode="disabled")
    first = trainer(run=run)
    first.fit()
    # simulate a crash right after step 5: only the step-5 checkpoint survives
    (run.checkpoint_dir / "tf" / "step_00000010.pt").unlink()
    resumed = trainer(run=run, learner=tiny_transformer(seed=123))
    assert resumed.resume() and resumed.step == 5
    resumed.fit()
    for (name, a), (_, b) in zip(straight.learner.state_dict().items(), resumed.learner.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoints_and_metrics_are_written(tmp_path):
    run = Run("c", {}, root=tmp_path, wandb_mode="disabled")
    trainer(run=run).fit()
    assert sorted(p.name for p in (run.checkpoint_dir / "tf").iterdir()) == ["step_00000005.pt", "step_00000010.pt"]
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert any('"tf/val_loss"' in line for line in lines)


class Exploding(Transformer):
    """Returns NaN loss from a given call on."""

    def __init__(self, nan_from: int):
        super().__init__(x_dim=2, max_support=5, n_embd=16, n_layer=1, n_head=2)
        self.calls, self.nan_from = 0, nan_from

    def loss(self, episode):
        self.calls += 1
        value = super().loss(episode)
        return value * float("nan") if self.training and self.calls == self.nan_from else value


def test_nonfinite_loss_stops_with_a_clear_message(tmp_path):
    run = Run("d", {}, root=tmp_path, wandb_mode="disabled")
    with pytest.raises(DivergenceError, match=r"non-finite loss .* at step 7.*last good checkpoint"):
        trainer(run=run, learner=Exploding(nan_from=9)).fit()  # 2 validation calls precede step 8


def test_nonfinite_loss_rolls_back_with_half_the_learning_rate(tmp_path):
    run = Run("e", {}, root=tmp_path, wandb_mode="disabled")
    t = trainer(run=run, learner=Exploding(nan_from=9), on_nonfinite="rollback")
    result = t.fit()
    assert result.steps == 10 and t.rollbacks == 1
    assert t.scheduler.base_lrs == [pytest.approx(1.5e-3)]
    assert any(row.get("event") == "rollback" for row in t.history)


def test_untrainable_learner_is_refused():
    from metaopt.learners import LeastSquares

    with pytest.raises(ValueError, match="no trainable parameters"):
        MetaTrainer(LeastSquares(), LinearRegression(2), progress=False)


def test_curriculum_grows_dims_and_support():
    seen = []

    class Recording(LinearRegression):
        def _sample(self, num_tasks, support, query, generator):
            episode = super()._sample(num_tasks, support, query, generator)
            nonzero = int((episode.x_support.abs().sum((0, 1)) > 0).sum()) if support else 0
            seen.append((support, nonzero))
            return episode

    t = MetaTrainer(tiny_transformer(), Recording(2), steps=6, batch_size=4, support=5, val_tasks=4, progress=False,
                    curriculum={"dims": {"start": 1, "end": 2, "every": 3},
                                "support": {"start": 3, "end": 5, "increment": 1, "every": 2}})
    seen.clear()  # drop the validation episode
    t.fit()
    assert seen == [(3, 1), (3, 1), (4, 1), (4, 2), (5, 2), (5, 2)]


def test_curriculum_is_refused_for_families_without_it_and_for_bad_stages():
    class Fixed(LinearRegression):
        curriculum_dims = False

    with pytest.raises(ValueError, match="does not support a dimension curriculum"):
        MetaTrainer(tiny_transformer(), Fixed(2), curriculum={"dims": {"start": 1, "end": 2, "every": 3}},
                    progress=False)
    with pytest.raises(ValueError, match="start <= end"):
        trainer(curriculum={"support": {"start": 6, "end": 5}})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_learns_and_resumes_exactly(tmp_path, precision):
    """Under autocast training tracks fp32; fp16's loss scale is checkpointed, so resuming equals not stopping."""
    def gd(precision):
        return MetaTrainer(GradientDescent(steps=1, lr=0.01, learn_lr=True), LinearRegression(4), steps=60,
                           batch_size=64, support=20, lr=0.05, val_every=60, progress=False, precision=precision)

    half, full = gd(precision), gd("fp32")
    before = full.validate()
    half.fit(), full.fit()
    assert half.learner.lr.item() > 0.3 and half.validate() < 0.8 * before
    assert half.validate() == pytest.approx(full.validate(), rel=0.05)
    straight = trainer(precision=precision)
    straight.fit()
    run = Run("h", {}, root=tmp_path, wandb_mode="disabled")
    trainer(run=run, precision=precision).fit()
    (run.checkpoint_dir / "tf" / "step_00000010.pt").unlink()
    resumed = trainer(run=run, learner=tiny_transformer(seed=9), precision=precision)
    assert resumed.resume() and resumed.step == 5
    assert resumed.scaler.state_dict() == torch.load(run.checkpoint_dir / "tf" / "step_00000005.pt",
                                                     weights_only=False)["scaler"]
    resumed.fit()
    for name, value in straight.learner.state_dict().items():
        assert torch.equal(value, resumed.learner.state_dict()[name]), name


def test_losses_are_read_from_the_device_only_when_logged(monkeypatch):
    """No synchronisation per step: the losses are read every log_every steps (and at validation/checkpoints)."""
    t = trainer(steps=12, log_every=4, val_every=6, checkpoint_every=12)
    reads = []
    read = t._read_pending
    monkeypatch.setattr(t, "_read_pending", lambda: reads.append(t.step) or read())
    result = t.fit()
    assert reads == [4, 6, 8, 12]
    assert [row["step"] for row in result.history if "loss" in row] == [4, 8, 12]


def test_compile_falls_back_to_eager_when_compiling_fails(caplog, monkeypatch):
    """A loss torch.compile cannot handle (as MAML's double backward; tests/test_runtime.py runs the real one,
    slow): one warning, then eager training exactly as without compile."""
    from metaopt.learners import MAML
    from metaopt.tasks import Sinusoid

    def refuse(fn, **options):
        def compiled(*args, **kwargs):
            raise RuntimeError("torch.compile with aot_autograd does not currently support double backward")
        return compiled

    monkeypatch.setattr(torch, "compile", refuse)

    def maml_trainer(compile):
        torch.manual_seed(0)
        learner = MAML({"kind": "mlp", "in_features": 1, "hidden": [8], "out_features": 1}, steps=1, inner_lr=0.05)
        return MetaTrainer(learner, Sinusoid(), steps=3, batch_size=4, support=5, val_every=3, val_tasks=4,
                           progress=False, compile=compile)

    compiled, eager = maml_trainer(True), maml_trainer(False)
    compiled.fit(), eager.fit()
    assert caplog.text.count("runs eagerly, torch.compile failed") == 1
    for name, value in eager.learner.state_dict().items():
        assert torch.equal(value, compiled.learner.state_dict()[name]), name


class Interrupted(Transformer):
    """Raises KeyboardInterrupt (as Ctrl-C would) in the middle of a training step, after its episodes were drawn."""

    def __init__(self, at_call: int):
        super().__init__(x_dim=2, max_support=5, n_embd=16, n_layer=1, n_head=2)
        self.calls, self.at_call = 0, at_call

    def loss(self, episode):
        self.calls += self.training
        if self.calls == self.at_call:
            raise KeyboardInterrupt
        return super().loss(episode)


@pytest.mark.parametrize("at_call", [3, 8])
def test_ctrl_c_mid_step_then_resume_equals_an_uninterrupted_run(tmp_path, at_call):
    """The checkpoint written on Ctrl-C holds the episode streams as of the last completed step."""
    straight = trainer()
    straight.fit()
    run = Run("i", {}, root=tmp_path, wandb_mode="disabled")
    torch.manual_seed(0)
    learner = Interrupted(at_call)
    learner.load_state_dict(tiny_transformer().state_dict())
    with pytest.raises(KeyboardInterrupt, match=f"interrupted at step {at_call - 1}; checkpoint saved"):
        trainer(run=run, learner=learner).fit()
    resumed = trainer(run=run, learner=tiny_transformer(seed=5))
    assert resumed.resume() and resumed.step == at_call - 1
    resumed.fit()
    for name, value in straight.learner.state_dict().items():
        assert torch.equal(value, resumed.learner.state_dict()[name]), name


class RaisesOnNaN(Exploding):
    """As a learner with a Cholesky in its loss: raises once its parameters are NaN."""

    def loss(self, episode):
        if not all(torch.isfinite(p).all() for p in self.parameters()):
            raise torch.linalg.LinAlgError("cholesky: the input is not positive-definite")
        return super().loss(episode)


@pytest.mark.parametrize("policy", ["stop", "rollback"])
def test_a_step_that_raises_after_an_unread_nonfinite_step_is_a_divergence(tmp_path, policy):
    """Losses are read every log_every steps: a NaN step applied in between makes the next step raise, and that
    is reported (or rolled back) as the divergence it is, at the step where it happened."""
    run = Run("n", {}, root=tmp_path, wandb_mode="disabled")
    t = trainer(run=run, learner=RaisesOnNaN(nan_from=9), on_nonfinite=policy, log_every=5)
    if policy == "stop":
        with pytest.raises(DivergenceError, match=r"at step 7"):
            t.fit()
    else:
        assert t.fit().steps == 10 and t.rollbacks == 1


def test_resume_sets_a_truncated_checkpoint_aside_and_continues_from_the_one_before(tmp_path, caplog):
    straight = trainer()
    straight.fit()
    run = Run("t", {}, root=tmp_path, wandb_mode="disabled")
    trainer(run=run).fit()
    latest = run.checkpoint_dir / "tf" / "step_00000010.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a write cut short
    resumed = trainer(run=run, learner=tiny_transformer(seed=4))
    assert resumed.resume() and resumed.step == 5
    assert "does not load" in caplog.text and (run.checkpoint_dir / "tf" / "step_00000010.pt.corrupt").exists()
    resumed.fit()
    for name, value in straight.learner.state_dict().items():
        assert torch.equal(value, resumed.learner.state_dict()[name]), name
