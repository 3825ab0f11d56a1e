"""Training environments: a functional model, a dataset and a horizon, unrolled under a functional optimizer.

An :class:`Environment` is what a learned optimizer is meta-trained on (the "task" of learned_optimization,
``tasks/base.py``): ``init`` starts an inner training run, ``unroll`` advances it by mini-batch steps and returns
the training losses, differentiably with respect to the optimizer's meta-parameters when autograd is on. Mini-batch
``t`` of a run is a function of the run's seed and ``t`` only, so the two members of an antithetic pair, or a run and
its truncated continuation, see the same batches (common random numbers).

The optimizer is passed as a *factory* ``meta_params -> GradientTransformation`` (a learned optimizer's
``module.optimizer``, or ``lambda m: adam(m["lr"])``), so one environment serves estimators that differentiate
through the meta-parameters, perturb them (ES), or hold them fixed (evaluation).

:meth:`Environment.from_module` makes one from what a user has: an ``nn.Module`` (or a factory of fresh ones), a
``DataLoader``/tensors/iterable of batches, and a loss; the model runs through ``torch.func.functional_call``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset

from optimizers._checks import positive_int
from optimizers.base import GradientTransformation, OptState, Params, apply_updates

__all__ = [
    "Environment",
    "MetaParams",
    "OptimizerFactory",
    "TrainState",
    "Unroll",
    "mlp_apply",
    "mlp_init",
]

MetaParams = Mapping[str, Tensor]
OptimizerFactory = Callable[[MetaParams | None], GradientTransformation]
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": lambda out, y: 0.5 * ((out - y) ** 2).sum(-1).mean(),
}


def _stack(trees: Sequence[Any]) -> Any:
    """Trees of equal structure stacked leaf by leaf along a new leading dimension."""
    return pytree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


class TrainState(NamedTuple):
    """One inner training run in progress."""

    params: Params  # the model's weights θ_t
    opt_state: OptState  # the functional optimizer's state
    step: int  # steps done so far (t)
    seed: int  # the run's seed: mini-batch t is drawn from a generator seeded by (seed, t)


class Unroll(NamedTuple):
    """The result of :meth:`Environment.unroll`."""

    losses: Tensor  # [steps] mini-batch training loss at θ_t before each update (differentiable when grad is on)
    state: TrainState  # the run after the last update


def _examples(data: Any, argument: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors of every example in ``data``: ``(x, y)`` tensors, a ``Dataset`` of ``(x, y)`` examples,
    or any other iterable (a ``DataLoader``) of ``(x, y)`` batches."""
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    else:
        examples = isinstance(data, Dataset)
        items = (data[i] for i in range(len(data))) if examples else iter(data)
        pairs = []
        for item in items:
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise ValueError(f"{argument} must give (x, y) pairs; got an item of type {type(item).__name__}")
            pairs.append([torch.as_tensor(t) for t in item])
        if not pairs:
            raise ValueError(f"{argument} is empty; give at least one (x, y) example")
        join = torch.stack if examples else torch.cat
        x, y = join([p[0] for p in pairs]), join([p[1] for p in pairs])
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{argument}: x and y must hold the same, non-zero number of examples; got {len(x)} and "
                         f"{len(y)}")
    return x, y


def mlp_init(sizes: Sequence[int], generator: torch.Generator, *, dtype: torch.dtype = torch.float32) -> Params:
    """Weights of an MLP ``sizes[0] -> ... -> sizes[-1]`` (PyTorch's default ``nn.Linear`` initialisation).

    Keys are ``"{i}.weight"`` / ``"{i}.bias"`` per layer ``i``, so MLPs of the same depth share parameter names
    (a :class:`~optimizers.LayerwiseMixture` built for one runs on the others).
    """
    if len(sizes) < 2:
        raise ValueError(f"mlp_init: sizes must be >= 2 positive ints (input, hidden..., output); got {list(sizes)!r}")
    sizes = [positive_int(f"sizes[{i}]", s, owner="mlp_init") for i, s in enumerate(sizes)]
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = fan_in**-0.5
        params[f"{i}.weight"] = (torch.rand(fan_out, fan_in, generator=generator, dtype=dtype) * 2 - 1) * bound
        params[f"{i}.bias"] = (torch.rand(fan_out, generator=generator, dtype=dtype) * 2 - 1) * bound
    return params


def mlp_apply(params: Params, x: Tensor) -> Tensor:
    """The MLP of :func:`mlp_init`: linear layers with ReLU between them."""
    layers = len(params) // 2
    for i in range(layers):
        x = F.linear(x, params[f"{i}.weight"], params[f"{i}.bias"])
        if i < layers - 1:
            x = torch.relu(x)
    return x


class Environment:
    """A model, a dataset and a horizon: the inner problem a learned optimizer is trained and tested on.

    Args:
        apply: the model, ``apply(params, x) -> outputs``.
        init_params: the starting weights, fixed (a pretrained model) or ``generator -> Params`` (a fresh draw
            per run, e.g. a pretrained body with a new head).
        x, y: training data; ``y`` class indices for ``loss="cross_entropy"``, targets ``[N, k]`` for ``"mse"``.
        horizon: the number of training steps ``T`` of a run.
        batch_size: mini-batch size (sampled with replacement); ``None`` for full-batch training.
        loss: ``"cross_entropy"``, ``"mse"`` (``½‖out - y‖²`` averaged over examples) or a callable.
        x_test, y_test: optional held-out data for :meth:`evaluate`.
        name: a label for results.
        eval_examples: how many training examples the whole-set training loss (:meth:`evaluate`, :meth:`curve`:
            learning-rate tuning, evaluation) is measured on: a fixed random subset, drawn once (seed 0); ``None``
            for all. A large set's full forward pass after every step would cost far more than the training.
    """

    def __init__(
        self,
        apply: Callable[[Params, Tensor], Tensor],
        init_params: Params | Callable[[torch.Generator], Params],
        x: Tensor,
        y: Tensor,
        *,
        horizon: int,
        batch_size: int | None = 64,
        loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
        x_test: Tensor | None = None,
        y_test: Tensor | None = None,
        name: str = "environment",
        eval_examples: int | None = None,
    ) -> None:
        positive_int("horizon", horizon, owner="Environment")
        if eval_examples is not None:
            positive_int("eval_examples", eval_examples, owner="Environment")
        if batch_size is not None:
            positive_int("batch_size", batch_size, owner="Environment")
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x and y must hold the same, non-zero number of examples; got {len(x)} and {len(y)}")
        if isinstance(loss, str) and loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)} or a callable")
        self.apply = apply
        self.init_params = init_params
        self.x, self.y = x, y
        self.x_test, self.y_test = x_test, y_test
        self.eval_examples = eval_examples
        self._x_eval, self._y_eval = x, y
        if eval_examples is not None and eval_examples < len(x):
            subset = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:eval_examples]
            self._x_eval, self._y_eval = x[subset.to(x.device)], y[subset.to(y.device)]
        self.horizon = horizon
        self.batch_size = batch_size
        self.loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
        self.name = name

    @classmethod
    def from_module(
        cls,
        model: nn.Module | Callable[[], nn.Module],
        data: Any,
        loss: str | Callable[[Tensor, Tensor], Tensor],
        *,
        horizon: int,
        batch_size: int | None = None,
        eval_data: Any = None,
        name: str | None = None,
        eval_examples: int | None = None,
    ) -> Environment:
        """An environment that trains a user's ``nn.Module`` on the user's data.

        Args:
            model: a module, whose current weights start every run (a pretrained model), or a function
                ``() -> nn.Module`` making a freshly initialised one per run (seeded from the run's generator).
                The weights are its parameters, called with ``torch.func.functional_call``; buffers stay the
                module's (not part of a run: no BatchNorm running statistics are carried between steps).
            data: the training set, held in memory: ``(x, y)`` tensors, a ``TensorDataset``-like dataset of
                ``(x, y)`` pairs, a ``DataLoader`` or any iterable of ``(x, y)`` batches (read once).
            loss: ``loss(outputs, y) -> scalar``, or ``"cross_entropy"`` / ``"mse"``.
            horizon: steps ``T`` of a run.
            batch_size: mini-batch size (drawn with replacement, by the run's seed); default: the
                ``DataLoader``'s, else 64 (the number of examples gives full-batch training).
            eval_data: held-out data for :meth:`evaluate` (``split="test"``), in the same forms.
            name: a label for results (default: the module's class name).
            eval_examples: the whole-set training loss is measured on this many examples (a fixed random subset;
                default all), as the constructor takes it.

        Raises:
            ValueError: data that is not ``(x, y)`` pairs, or a factory whose modules differ in parameter names.
        """
        template = model if isinstance(model, nn.Module) else model()
        if not isinstance(template, nn.Module):
            raise ValueError(f"model must be an nn.Module or a function returning one; it returned "
                             f"{type(template).__name__}")
        names = [k for k, _ in template.named_parameters()]
        if batch_size is None:
            batch_size = getattr(data, "batch_size", None) or 64
        device = next(template.parameters()).device
        x, y = (t.to(device) for t in _examples(data, "data"))
        x_test = y_test = None
        if eval_data is not None:
            x_test, y_test = (t.to(device) for t in _examples(eval_data, "eval_data"))

        def apply(params: Params, inputs: Tensor) -> Tensor:
            return functional_call(template, params, (inputs,))

        if isinstance(model, nn.Module):
            init_params: Params | Callable[[torch.Generator], Params] = {
                k: p.detach().clone() for k, p in model.named_parameters()}
        else:
            def init_params(generator: torch.Generator) -> Params:
                seed = int(torch.randint(2**62, (), generator=generator))
                with torch.random.fork_rng(devices=[]):  # the module's initialisation draws from a seeded stream
                    torch.manual_seed(seed)
                    fresh = model()
                found = [k for k, _ in fresh.named_parameters()]
                if found != names:
                    raise ValueError(f"model() made modules with parameters {found!r} and {names!r}; a factory "
                                     "must build the same architecture every time")
                return {k: p.detach().to(device) for k, p in fresh.named_parameters()}

        return cls(apply, init_params, x, y, horizon=horizon, batch_size=batch_size, loss=loss, x_test=x_test,
                   y_test=y_test, name=name or type(template).__name__, eval_examples=eval_examples)

    # ------------------------------------------------------------------ runs
    def init(
        self, optimizer: OptimizerFactory, meta_params: MetaParams | None, generator: torch.Generator
    ) -> TrainState:
        """A fresh run: initial weights (drawn from ``generator`` if ``init_params`` is a function) and a seed."""
        seed = int(torch.randint(2**62, (), generator=generator))
        if callable(self.init_params):
            params = self.init_params(generator)
        else:
            params = {k: v.detach().clone() for k, v in self.init_params.items()}
        return TrainState(params, optimizer(meta_params).init(params), 0, seed)

    def unroll(
        self,
        optimizer: OptimizerFactory,
        meta_params: MetaParams | None,
        steps: int,
        *,
        state: TrainState | None = None,
        generator: torch.Generator | None = None,
        first_order: bool = False,
    ) -> Unroll:
        """Train for ``steps`` mini-batch steps from ``state`` (or a fresh run drawn from ``generator``).

        With autograd on, the losses are differentiable with respect to ``meta_params`` through every update;
        ``first_order=True`` treats the inner gradients as constants (no second derivatives). Under
        ``torch.no_grad()`` nothing is recorded (evolution strategies, evaluation).
        """
        if state is None:
            if generator is None:
                raise ValueError("unroll needs a state to continue or a generator to start a fresh run; got neither")
            state = self.init(optimizer, meta_params, generator)
        transform = optimizer(meta_params)
        losses = []
        for _ in range(steps):
            loss, state = self._step(transform, state, first_order)
            losses.append(loss)
        return Unroll(torch.stack(losses) if losses else self.x.new_zeros(0), state)

    @torch.no_grad()
    def unroll_runs(
        self,
        optimizer: OptimizerFactory,
        meta_params: Sequence[MetaParams | None],
        steps: int,
        generators: Sequence[torch.Generator],
    ) -> Tensor:
        """The training losses ``[R, steps]`` of ``R`` fresh runs, run ``i`` under ``meta_params[i]`` and drawn from
        ``generators[i]``, advanced together: one ``torch.func.vmap``-ed step over a leading run dimension.

        The same numbers as ``R`` calls of :meth:`unroll` under ``torch.no_grad()`` (same weights, batches and
        updates), in one batched call per step instead of ``R``; memory grows ``R``-fold. Nothing is recorded for
        autograd (evolution strategies). The model and the optimizer must be functional enough for ``vmap``: no
        ``.item()`` or in-place changes of their inputs, no data-dependent control flow.
        """
        if len(meta_params) != len(generators) or not generators:
            raise ValueError(f"unroll_runs needs one generator per run; got {len(meta_params)} meta-parameter sets "
                             f"and {len(generators)} generators")
        states = [self.init(optimizer, m, g) for m, g in zip(meta_params, generators)]
        learned = meta_params[0] is not None
        if any((m is not None) != learned for m in meta_params):
            raise ValueError("unroll_runs: give meta-parameters for every run or for none")
        params, opt_state = _stack([s.params for s in states]), _stack([s.opt_state for s in states])
        metas = _stack(list(meta_params)) if learned else None
        full_batch = self.batch_size is None  # every run sees the whole training set: not copied R times

        def step(p: Params, o: OptState, m: MetaParams | None, x: Tensor, y: Tensor):
            def loss_of(q: Params) -> tuple[Tensor, Tensor]:
                loss = self.loss_fn(self.apply(q, x), y)
                return loss, loss

            grads, loss = torch.func.grad(loss_of, has_aux=True)(p)
            updates, o = optimizer(m).update(grads, o, p, loss=loss)
            return apply_updates(p, updates), o, loss

        data_dims = (None, None) if full_batch else (0, 0)
        batched = torch.func.vmap(step, in_dims=(0, 0, 0 if learned else None, *data_dims))
        losses = []
        for t in range(steps):
            if full_batch:
                x, y = self.x, self.y
            else:
                x, y = (torch.stack(part) for part in zip(*(self.batch(s.seed, t) for s in states)))
            params, opt_state, loss = batched(params, opt_state, metas, x, y)
            losses.append(loss)
        return torch.stack(losses, 1) if losses else self.x.new_zeros(len(states), 0)

    def _step(
        self, transform: GradientTransformation, state: TrainState, first_order: bool
    ) -> tuple[Tensor, TrainState]:
        x, y = self.batch(state.seed, state.step)
        differentiable = torch.is_grad_enabled()
        with torch.enable_grad():
            params = {k: p if p.requires_grad else p.detach().requires_grad_() for k, p in state.params.items()}
            loss = self.loss_fn(self.apply(params, x), y)
            create_graph = differentiable and not first_order
            grads = torch.autograd.grad(
                loss, list(params.values()), create_graph=create_graph, retain_graph=differentiable
            )
        if not differentiable:
            params, loss = state.params, loss.detach()
        grads = dict(zip(params, grads if differentiable and not first_order else (g.detach() for g in grads)))
        updates, opt_state = transform.update(grads, state.opt_state, params, loss=loss)
        return loss, TrainState(apply_updates(params, updates), opt_state, state.step + 1, state.seed)

    def batch(self, seed: int, step: int) -> tuple[Tensor, Tensor]:
        """Mini-batch ``step`` of the run with ``seed`` (the whole training set when ``batch_size`` is None)."""
        if self.batch_size is None:
            return self.x, self.y
        generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
        index = torch.randint(len(self.x), (self.batch_size,), generator=generator).to(self.x.device)
        return self.x[index], self.y[index]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, params: Params, *, split: str = "train") -> float:
        """Loss of ``params`` on the whole training (``"train"``; its ``eval_examples`` subset) or held-out
        (``"test"``) set."""
        if split not in ("train", "test") or (split == "test" and self.x_test is None):
            raise ValueError(f"split must be 'train' or, when x_test was given, 'test'; got {split!r}")
        x, y = (self._x_eval, self._y_eval) if split == "train" else (self.x_test, self.y_test)
        return float(self.loss_fn(self.apply(params, x), y))

    @torch.no_grad()
    def curve(
        self,
        optimizer: OptimizerFactory,
        meta_params: MetaParams | None,
        steps: int,
        generator: torch.Generator,
        *,
        split: str = "train",
        on_step: Callable[[TrainState], None] | None = None,
    ) -> Tensor:
        """Whole-set loss before training and after each of ``steps`` updates: ``[steps + 1]`` (no autograd).

        ``on_step(state)`` is called after each update, e.g. to read a learned optimizer's coefficients.
        """
        state = self.init(optimizer, meta_params, generator)
        transform = optimizer(meta_params)
        values = [self.evaluate(state.params, split=split)]
        for _ in range(steps):
            _, state = self._step(transform, state, first_order=True)
            values.append(self.evaluate(state.params, split=split))
            if on_step is not None:
                on_step(state)
        return torch.tensor(values, dtype=torch.float64)
