"""Device, precision and compile settings (metaopt.runtime), and the solvers and samplers they rely on.

CI has no GPU, so the CUDA branches of device resolution run against a patched ``torch.cuda``, and episodes
are moved to the ``meta`` device: a tensor left behind on the CPU by a sampler or a learner shows there exactly as
it would on a GPU (the ``cuda`` case itself runs in ``test_contracts.py`` when a GPU is present).
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

from conftest import generator
from metaopt.learners import MAML, AdaptiveRidge, LeastSquares, Ridge
from metaopt.learners.incontext.mesa import MesaAttention
from metaopt.learners.ridge_variants import OracleRidge
from metaopt.metrics import ridge_weights
from metaopt.runtime import (
    PRECISIONS, CompiledLoss, LossScaler, autocast, check_device, check_precision, compile_loss, full_precision,
    resolve_device,
)
from metaopt.tasks import LinearRegression, NoisyLinearRegression
from test_contracts import CASES, FAMILY_CLASSES, NUM_TASKS, make, params, prepare, sizes


# ---------------------------------------------------------------------- device
@pytest.fixture
def two_gpus(monkeypatch):
    """``torch.cuda`` as it looks on a machine with two GPUs (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"device='{spec}' but no CUDA device is available; use device=auto"):
            resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "mps", "", "cuda:0 "])
def test_a_misspelt_device_is_refused_with_the_allowed_forms(spec):
    with pytest.raises(ValueError, match=r"device must be auto, cpu, cuda or cuda:N"):
        resolve_device(spec)
    with pytest.raises(ValueError, match=r"device must be auto, cpu, cuda or cuda:N"):
        check_device(spec)


def test_the_spelling_check_needs_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("auto", "cpu", "cuda", "cuda:0", "cuda:7"):
        assert check_device(spec) == spec


def test_auto_and_cuda_mean_the_local_rank_gpu(two_gpus, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of a node under torchrun
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is taken as given
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_gpu_that_is_not_there_is_refused(two_gpus, monkeypatch):
    with pytest.raises(ValueError, match=r"device='cuda:2' but only 2 CUDA device\(s\) are visible"):
        resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK='2' and 2 CUDA device\(s\) are visible"):
        resolve_device("auto")


# ---------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_runs_under_cpu_autocast(precision):
    assert check_precision(precision, "cpu") == precision
    x = torch.randn(3, 4)
    with autocast(precision, "cpu"):
        product = x @ x.T
    assert product.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def test_an_unknown_precision_is_refused():
    for call in (lambda: check_precision("fp8", "cpu"), lambda: autocast("half", "cpu"),
                 lambda: LossScaler("float16", "cpu")):
        with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'fp16'\)"):
            call()


def test_a_precision_autocast_does_not_take_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.float32)  # as if autocast ignored it
    with pytest.raises(ValueError, match=r"precision='fp16' is not supported by autocast on cpu .*use precision=fp32"):
        check_precision("fp16", "cpu")


def _linear_model() -> tuple[nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_scaler_passes_through_without_fp16(precision):
    scaler = LossScaler(precision, "cpu")
    model, optimizer = _linear_model()
    before = model.weight.detach().clone()
    loss = model(torch.ones(2, 3)).sum()
    assert not scaler.enabled and scaler.scale(loss) is loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    assert scaler.step(optimizer).item() == 0.0
    scaler.update()
    torch.testing.assert_close(model.weight.detach(), before - 0.1 * 2.0 * torch.ones(1, 3))
    assert scaler.state_dict() == {}


def test_fp16_scaling_steps_like_fp32_and_skips_an_overflow():
    scaler = LossScaler("fp16", "cpu")
    assert scaler.enabled
    model, optimizer = _linear_model()
    reference, reference_optimizer = _linear_model()
    x = torch.ones(2, 3)
    scaler.scale(model(x).sum()).backward()
    scaler.unscale_(optimizer)
    torch.testing.assert_close(model.weight.grad, torch.full((1, 3), 2.0))  # true gradients: clip them here
    assert scaler.step(optimizer).item() == 0.0
    scaler.update()
    reference(x).sum().backward()
    reference_optimizer.step()
    torch.testing.assert_close(model.weight, reference.weight)

    scale, weight = scaler.state_dict()["scale"], model.weight.detach().clone()
    optimizer.zero_grad()
    scaler.scale(model(x).sum() * float("inf")).backward()
    assert scaler.step(optimizer).item() == 1.0  # skipped: the weights keep their values
    scaler.update()
    torch.testing.assert_close(model.weight.detach(), weight)
    assert scaler.state_dict()["scale"] == scale / 2

    restored = LossScaler("fp16", "cpu")
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    fresh = LossScaler("fp16", "cpu")
    fresh.load_state_dict(LossScaler("fp32", "cpu").state_dict())  # resuming an fp32 run in fp16
    assert fresh.state_dict()["scale"] == 2.0 ** 16


# ---------------------------------------------------------------------- solvers in float32
def _bf16(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


@pytest.mark.parametrize("learner", [Ridge(0.5), Ridge(2.0), LeastSquares(), AdaptiveRidge(cap=3.0)],
                         ids=["ridge_dual", "ridge_primal", "least_squares", "adaptive_ridge"])
@pytest.mark.parametrize("support", [3, 12])
def test_solvers_predict_in_float32_under_autocast(learner, support):
    episode = LinearRegression(dim=6).sample(4, support, 5, generator=generator(1))
    expected = learner(episode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = learner(episode)
        assert (episode.x_query @ episode.x_query.transpose(1, 2)).dtype == torch.bfloat16  # autocast is on
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_oracle_ridge_and_ridge_weights_keep_their_precision_under_autocast():
    episode = NoisyLinearRegression(dim=4).sample(3, 6, 2, generator=generator(2))
    learner = OracleRidge()
    torch.testing.assert_close(_bf16(lambda: learner(episode)), learner(episode))
    x, y, lam = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 1, dtype=torch.float64), torch.ones(2)
    assert _bf16(lambda: ridge_weights(x, y, lam)).dtype == torch.float64
    torch.testing.assert_close(_bf16(lambda: ridge_weights(x, y, lam)), ridge_weights(x, y, lam))


def test_full_precision_casts_half_arguments_up_and_turns_autocast_off():
    seen = {}

    @full_precision
    def solve(a: torch.Tensor, *, b: torch.Tensor, scale: float) -> torch.Tensor:
        seen.update(a=a.dtype, b=b.dtype, autocast=torch.is_autocast_enabled("cpu"))
        return a @ b * scale

    a, b = torch.randn(3, 3, dtype=torch.bfloat16), torch.randn(3, 2, dtype=torch.float16)
    assert _bf16(lambda: solve(a, b=b, scale=2.0)).dtype == torch.float32
    assert seen == {"a": torch.float32, "b": torch.float32, "autocast": False}
    assert torch.is_autocast_enabled("cpu") is False


def test_mesa_attention_solves_in_float32_under_autocast():
    attention = MesaAttention(4, 2)
    q, k, v = (torch.randn(2, 2, 5, 2, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    out = _bf16(lambda: attention.attend(q, k, v, mask))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attention.attend(q.float(), k.float(), v.float(), mask))


# ---------------------------------------------------------------------- compile
class Quadratic(nn.Module):
    """A learner-like module whose ``loss`` optionally takes one differentiable inner step (as MAML does)."""

    def __init__(self, inner_step: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        self.inner_step = inner_step

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        if self.inner_step:
            (grad,) = torch.autograd.grad((w * x).pow(2).sum(), w, create_graph=True)
            w = w - 0.1 * grad
        return ((w * x).sin() * x).sum().pow(2)


def _loss_and_grad(fn, module: Quadratic, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    module.zero_grad()
    loss = fn(x)
    loss.backward()
    return loss.detach(), module.w.grad.clone()


def test_compile_off_is_the_function_itself():
    module = Quadratic()
    assert compile_loss(module.loss, False, "quadratic") == module.loss


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_loss_equals_the_eager_one(backend, caplog):
    torch._dynamo.reset()
    module, x = Quadratic(), torch.tensor([1.0, 2.0, -0.5])
    compiled = compile_loss(module.loss, True, "quadratic", backend=backend)
    assert isinstance(compiled, CompiledLoss)
    with caplog.at_level(logging.WARNING, logger="metaopt.runtime"):
        for scale in (1.0, 2.0):
            got, expected = _loss_and_grad(compiled, module, scale * x), _loss_and_grad(module.loss, module, scale * x)
            torch.testing.assert_close(got, expected)
    assert compiled.active and not caplog.records


@pytest.mark.parametrize("when", ["wrapping", "calling"])
def test_a_compile_failure_warns_once_and_runs_eagerly(when, monkeypatch, caplog):
    calls = []

    def failing_compile(fn, **options):
        calls.append(fn)
        if when == "wrapping":
            raise RuntimeError("torch.compile is not supported on this Python\nsecond line")

        def compiled(*args, **kwargs):
            calls.append("call")
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    module, x = Quadratic(), torch.tensor([1.0, 2.0, -0.5])
    with caplog.at_level(logging.WARNING, logger="metaopt.runtime"):
        loss = compile_loss(module.loss, True, "learner 'maml'")
        for _ in range(3):
            torch.testing.assert_close(_loss_and_grad(loss, module, x), _loss_and_grad(module.loss, module, x))
    assert not loss.active
    assert len(calls) == (1 if when == "wrapping" else 2)  # compiled once, tried once, never again
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "learner 'maml' runs eagerly" in message and "RuntimeError" in message and "\n" not in message
    assert ("not supported on this Python" if when == "wrapping" else "no working C++ compiler") in message


def test_an_error_of_the_loss_itself_is_raised_and_compiling_stays_on(caplog):
    def loss(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 3:
            raise ValueError("loss needs 3 entries")
        return x.sum()

    compiled = compile_loss(loss, True, "strict", backend="eager")
    with caplog.at_level(logging.WARNING, logger="metaopt.runtime"), pytest.raises(ValueError, match="3 entries"):
        compiled(torch.ones(2))
    assert compiled.active and not caplog.records
    assert compiled(torch.ones(3)).item() == 3.0


def test_a_loss_whose_compiled_graph_cannot_be_differentiated_falls_back_at_its_first_call(monkeypatch, caplog):
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("torch.compile with aot_autograd does not currently support double backward")

    monkeypatch.setattr(torch, "compile", lambda fn, **options: lambda *args: NoBackward.apply(fn(*args)))
    module, x = Quadratic(), torch.tensor([1.0, 2.0, -0.5])
    loss = compile_loss(module.loss, True, "quadratic")
    with caplog.at_level(logging.WARNING, logger="metaopt.runtime"):
        with torch.no_grad():
            loss(x)  # no gradients asked: nothing to check yet
        assert loss.active and not caplog.records
        torch.testing.assert_close(_loss_and_grad(loss, module, x), _loss_and_grad(module.loss, module, x))
    assert not loss.active and "double backward" in caplog.records[0].getMessage()


def test_maml_style_double_backward_falls_back_to_eager(caplog):
    """The real case: aot_autograd (inductor's front end) refuses to differentiate its backward graph."""
    torch._dynamo.reset()
    module, x = Quadratic(inner_step=True), torch.tensor([1.0, 2.0, -0.5])
    loss = compile_loss(module.loss, True, "maml", backend="aot_eager")
    with caplog.at_level(logging.WARNING, logger="metaopt.runtime"):
        torch.testing.assert_close(_loss_and_grad(loss, module, x), _loss_and_grad(module.loss, module, x))
    assert not loss.active and len(caplog.records) == 1
    assert "maml runs eagerly" in caplog.records[0].getMessage()
    assert "double backward" in caplog.records[0].getMessage()


@pytest.mark.slow
def test_maml_meta_training_with_compile_on_runs_eagerly_with_one_warning(caplog):
    """MAML's graph reaches a leaf besides its parameters; the backward check must reach it too (~15 s)."""
    torch._dynamo.reset()
    example = MAML.example()
    learner, episode = example.learner, example.family.sample(4, 5, 3, generator=generator(0))
    loss = compile_loss(learner.loss, True, "maml", backend="aot_eager")
    with caplog.at_level(logging.WARNING, logger="metaopt.runtime"):
        loss(episode).backward()
    compiled_grads = [p.grad.clone() for p in learner.parameters()]
    learner.zero_grad()
    learner.loss(episode).backward()
    for got, parameter in zip(compiled_grads, learner.parameters()):
        torch.testing.assert_close(got, parameter.grad)
    assert not loss.active and len(caplog.records) == 1


@pytest.mark.slow
def test_inductor_compiles_a_loss_on_this_cpu():
    """inductor needs a C++ compiler; with one (as here) the compiled loss equals eager (~30 s to compile)."""
    torch._dynamo.reset()
    module, x = Quadratic(), torch.tensor([1.0, 2.0, -0.5])
    compiled = compile_loss(module.loss, True, "quadratic")
    torch.testing.assert_close(_loss_and_grad(compiled, module, x), _loss_and_grad(module.loss, module, x))
    assert compiled.active


# ---------------------------------------------------------------------- sampling on the target device
def _tensors(episode) -> dict[str, torch.Tensor]:
    names = ("x_support", "y_support", "x_query", "y_query", "x_unlabeled")
    fields = {name: getattr(episode, name) for name in names if getattr(episode, name) is not None}
    return {**fields, **{f"info[{key!r}]": value for key, value in episode.info.items()}}


@pytest.mark.parametrize("cls", FAMILY_CLASSES)
def test_every_family_samples_every_tensor_onto_the_device_asked_for(cls):
    """Families draw on the CPU with the run's generator (same episodes on any device and rank), then move."""
    family = make(cls)
    on_cpu = family.sample(NUM_TASKS, *sizes(family), generator=generator(0), device="cpu")
    on_meta = family.sample(NUM_TASKS, *sizes(family), generator=generator(0), device="meta")
    cpu, meta = _tensors(on_cpu), _tensors(on_meta)
    assert set(cpu) == set(meta)
    for name, tensor in meta.items():
        assert tensor.device.type == "meta", f"{cls.__name__}: {name} stayed on {tensor.device}"
        assert tensor.shape == cpu[name].shape and tensor.dtype == cpu[name].dtype, name
    assert all(t.device.type == "cpu" for t in cpu.values())


# what a meta tensor cannot do because it holds no values: data-dependent control flow and shapes (a host sync on
# a GPU, not a device error), and the scikit-learn baselines, which fit on the CPU by design
DATA_DEPENDENT = re.compile(
    r"item\(\) cannot be called on meta tensors|torch\.nonzero\(\)|Cannot copy out of meta tensor")


@pytest.mark.parametrize("case", params(CASES))
def test_every_learner_keeps_its_tensors_on_the_episode_device(case):
    learner, episode = prepare(case)
    learner.eval()
    with torch.no_grad():
        learner(episode)  # lazy set-up (held-out tuning) on the CPU, as a run does it before moving
        learner.to("meta")
        try:
            predictions = learner(episode.to("meta"))
        except (RuntimeError, NotImplementedError) as error:
            if not DATA_DEPENDENT.search(str(error)):
                raise AssertionError(f"{case.id} on the meta device: {error}") from error
            return
    assert predictions.device.type == "meta"
