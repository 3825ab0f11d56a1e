"""The differentiable inner loop: a functional model fitted to each task's support set by a functional optimizer.

For every task ``τ`` of an episode, starting from the initialisation ``θ_0``,

    g_t = ∇_θ L_τ^support(θ_t),   (u_t, s_{t+1}) = opt.update(g_t, s_t, θ_t),   θ_{t+1} = θ_t + u_t,

for ``steps`` steps, then the queries are predicted with ``θ_steps``. Every operation is out of place, so
``learner.loss(episode).backward()`` differentiates through the whole unroll: into the initialisation when it
is meta-learned (MAML, Finn et al. 2017), into the optimizer's tensors (Meta-SGD's step sizes, Li et al.
2017; a learned optimizer's network) and into parameters shared by all tasks that the inner loop leaves alone
(ANIL's body, Raghu et al. 2020). ``first_order=True`` treats every ``g_t`` as a constant (FO-MAML);
``truncate=K`` does so for all but the last ``K`` steps, so second-order terms, and their memory, come
only from the last ``K`` steps while the initialisation keeps its direct path.

Strategies of the ``func`` backend (``metaopt.learners.task_folding.STRATEGIES``, the ones a hypernetwork's
target CNN runs with too; all give the same numbers, ``tests/test_inner_loop.py``):

- ``"batched"``: the initialisation is expanded to ``[T, ...]`` per-task weights, the model runs on all tasks
  at once under ``torch.func.vmap`` (batched matmuls; for convolutions, grouped convolutions), and one
  ``torch.autograd.grad`` of the summed task losses gives every task its own gradient, because tasks share
  no weights.
- ``"folded"``: as ``"batched"``, but the model runs through :func:`~metaopt.learners.task_folding.folded_call`,
  which keeps the tasks folded into the channels from the first layer to the last (one grouped convolution and
  one batch norm per layer, no transposes between them); for ``nn.Sequential`` conv nets (``conv4``,
  ``hypernets.TargetCNN``).
- ``"vmap"``: ``torch.func.vmap`` over tasks of the whole loop with ``torch.func.grad_and_value`` inside
  (refused for models with batch, instance or layer norm, whose meta-gradients functorch gets wrong).
- ``"loop"``: task by task, each with its own graph (plain convolutions).
- ``"auto"`` (default) picks ``"batched"`` for models without convolutions, ``"folded"`` for conv nets it can
  fold, and ``"loop"`` for other conv nets (``task_folding.resolve_strategy``).

Measured with ``python -m benchmarks maml`` (2 threads, best of several meta-steps, forward + inner loop +
meta-gradient, gradients equal to higher's; ``benchmarks/results/maml.json`` has the latest figures):

- MLP 1-40-40-1, 25 tasks, 10 shots, 5 SGD steps (0.04 GFLOP): ``batched`` ~8 ms, ``vmap`` ~9 ms (its nested
  functorch levels cost more than the arithmetic), ``loop`` and ``higher`` ~100 ms: batched wins by ~12×.
- 4-conv 32-channel CNN, 28×28, 5-way 1-shot, 15 queries per class, 16 tasks, 5 steps (36 GFLOP): ``folded``
  0.78 s, ``batched`` 1.0 s, ``loop`` 1.33 s, ``higher`` 1.29 s, learn2learn 1.22–1.28 s (1.6× the fastest
  reference). Folding wins through parallelism (its kernels are 16× larger; with one thread it ties with the
  loop), the faster second-order batch norm and max-pool of :mod:`metaopt.learners.fast_layers`, and the
  allocator setting of :mod:`metaopt.allocator` (without it the 120 MB activations come as fresh pages in every
  step). The work is memory-bound: 46 GFLOP/s, 14% of this machine's fp32 matmul rate.

Under ``torch.compile`` (a recipe's ``compile: true``, :func:`metaopt.runtime.compile_loss`) the inner
gradients come from ``torch.func.grad_and_value`` instead of ``torch.autograd.grad``: the compiler traces
functorch's transforms and differentiates through them, while a double backward inside a compiled region is
refused. The compiled sinusoid meta-step takes ~3.5 ms against ~5.8 ms eager on one thread (after a first
compilation of 17–45 s, which inductor's cache then shortens to seconds).

``backend="higher"`` computes the same thing task by task with the ``higher`` library
(``higher.innerloop_ctx``), the classic implementation, and serves as the reference in tests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from metaopt.checks import non_negative_int, one_of, optional
from metaopt.episodes import Episode
from metaopt.kinds import EpisodeKind
from metaopt.learners.base import Example, Learner, check_module_input
from metaopt.learners.task_folding import STRATEGIES, per_task_call, resolve_strategy
from metaopt.tasks.regression import LinearRegression
from optimizers import FunctionalOptimizer, GradientTransformation, Params, apply_updates, sgd

INITS = ("zero", "random", "meta")
BACKENDS = ("func", "higher")

OptimizerLike = GradientTransformation | nn.Module


def _detached(tree: Params) -> Params:
    return {k: v.detach() for k, v in tree.items()}


# Layers whose second-order gradients come out wrong under ``vmap(grad(...))`` (functorch's batching rule for
# their backward, pytorch/functorch#534; measured here: batch, instance and layer norm off by ~1e-3, group norm
# exact). The batched and loop strategies differentiate them with plain autograd and are exact.
_WRONG_UNDER_VMAP_GRAD = (nn.modules.batchnorm._NormBase, nn.LayerNorm)


class InnerLoop(Learner):
    """An explicit learner: ``steps`` of a functional optimizer on each task's support loss, then predict.

    Args:
        model: any ``nn.Module`` mapping one task's inputs ``[N, *x]`` to outputs ``[N, *y]`` (``[N, classes]``
            for classification); it runs through ``torch.func.functional_call`` on the adapted weights.
        optimizer: a ``GradientTransformation`` (e.g. ``optimizers.sgd(0.01)``; tensors requiring grad inside
            it are meta-learned) or an ``nn.Module`` with ``.optimizer()`` returning one (a learned optimizer,
            Meta-SGD's step sizes), whose parameters become meta-parameters of this learner.
        steps: number of inner steps (>= 0).
        init: ``"meta"``: the model's parameters are the meta-learned initialisation (MAML); ``"random"``: the
            model's initial values, fixed; ``"zero"``: zeros, fixed.
        first_order: treat the inner gradients as constants (no second-order terms).
        truncate: backpropagate through the inner gradients of the last ``truncate`` steps only.
        backend: ``"func"`` (vectorised over tasks) or ``"higher"`` (per-task loop with ``higher``, reference).
        strategy: how the ``func`` backend vectorises (module docstring): auto, batched, folded, vmap or loop.
        adapt: names (or name prefixes) of the parameters the inner loop adapts; the others are shared by all
            tasks and meta-learned when ``init="meta"`` (ANIL adapts only the head). ``None`` adapts all. When
            the model is an ``nn.Sequential`` whose leading layers hold no adapted weight, the func backend runs
            those layers once per episode instead of at every inner step (``body_size`` of them).

    Under ``torch.no_grad`` (validation, comparison) the inner loop still runs, without building the
    meta-gradient graph.
    """

    kinds = ("regression", "binary", "classification")
    implicit = False
    capabilities = frozenset()  # the inner loop runs autograd itself, which torch.func cannot differentiate

    @classmethod
    def example(cls) -> Example:
        return Example(cls(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)), sgd(0.1), 1),
                       LinearRegression(dim=3))

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerLike,
        steps: int,
        *,
        init: str = "meta",
        first_order: bool = False,
        truncate: int | None = None,
        backend: str = "func",
        strategy: str = "auto",
        adapt: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"InnerLoop: model must be an nn.Module; got {type(model).__name__}")
        non_negative_int("steps", steps, owner="InnerLoop")
        for name, value, allowed in (("init", init, INITS), ("backend", backend, BACKENDS),
                                     ("strategy", strategy, STRATEGIES)):
            one_of(name, value, allowed, owner="InnerLoop")
        optional(non_negative_int, "truncate", truncate, owner="InnerLoop")
        if isinstance(optimizer, nn.Module):
            if not callable(getattr(optimizer, "optimizer", None)):
                raise ValueError("InnerLoop: an nn.Module optimizer needs an .optimizer() method; got "
                                 f"{type(optimizer).__name__}")
            self.learned_optimizer: nn.Module | None = optimizer
            self._transform: GradientTransformation | None = None
        elif isinstance(optimizer, GradientTransformation):
            self.learned_optimizer, self._transform = None, optimizer
        else:
            raise ValueError(f"InnerLoop: optimizer must be a GradientTransformation or an nn.Module with "
                             f".optimizer(); got {type(optimizer).__name__}")
        if strategy == "vmap" and any(isinstance(m, _WRONG_UNDER_VMAP_GRAD) for m in model.modules()):
            raise ValueError("InnerLoop: strategy='vmap' gives wrong meta-gradients through batch/instance/layer norm "
                             "(functorch batching rule, pytorch/functorch#534); got a model with one; expected "
                             "strategy 'auto', 'batched', 'folded' or 'loop'")
        self.model = model
        self.steps, self.init, self.first_order, self.truncate = steps, init, bool(first_order), truncate
        self.backend, self.strategy = backend, strategy
        names = [n for n, _ in model.named_parameters()]
        if adapt is None:
            self.adapted_names = names
        else:
            self.adapted_names = [n for n in names if any(n == a or n.startswith(a + ".") for a in adapt)]
            if not self.adapted_names:
                raise ValueError(f"InnerLoop: adapt={list(adapt)!r} matches no parameter; expected some of {names}")
        self.body_size = _frozen_prefix(model, self.adapted_names)
        if init != "meta":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if init == "zero" and name in self.adapted_names:
                        p.zero_()
                    p.requires_grad_(False)

    # ------------------------------------------------------------------ pieces
    def optimizer(self) -> GradientTransformation:
        """The functional optimizer of the inner loop (a learned optimizer's rule on its current parameters)."""
        return self._transform if self.learned_optimizer is None else self.learned_optimizer.optimizer()

    def initial_params(self) -> tuple[Params, Params]:
        """``(adapted, shared)``: the initialisation of the adapted weights and the weights shared by all tasks."""
        params = dict(self.model.named_parameters())
        adapted = {n: params[n] for n in self.adapted_names}
        return adapted, {n: p for n, p in params.items() if n not in adapted}

    def elementwise_optimizer(self) -> bool:
        """Whether the optimizer acts element by element, so it may update all tasks' ``[T, ...]`` weights at once.

        Hand-designed transforms (``optimizers.sgd``, ``adam``, ...) do; a learned optimizer does only if it says
        so with a class attribute ``elementwise = True`` (a layer-wise one computes norms per tensor, so it is
        vmapped over tasks instead). Updating all tasks at once saves ~0.15 ms per inner step (vmap overhead).
        """
        return self.learned_optimizer is None or bool(getattr(self.learned_optimizer, "elementwise", False))

    def resolved_strategy(self) -> str:
        """The ``func`` strategy actually used (``auto`` resolved by the model's layers, ``resolve_strategy``)."""
        return resolve_strategy(self.strategy, self.model)

    def _constant_step(self, step: int) -> bool:
        """Whether the inner gradient of ``step`` is treated as a constant (first-order or truncated away)."""
        return self.first_order or (self.truncate is not None and step < self.steps - self.truncate)

    def _inner_model(self) -> nn.Module:
        """The part of the model the inner loop runs: the layers after the frozen body (all of it without one)."""
        return _children(self.model, self.body_size, None) if self.body_size else self.model

    def _body(self, x: Tensor) -> Tensor:
        """Inputs ``[T, N, *x]`` through the frozen body, once (its weights are the same for every task).

        One vmapped call folds the tasks into the batch (no per-task weight copies); normalisation layers
        still see one task at a time.
        """
        return vmap(_children(self.model, 0, self.body_size))(x) if self.body_size else x

    def _run_tasks(self, params: Params, x: Tensor, strategy: str) -> Tensor:
        """Model outputs for every task: adapted weights ``[T, ...]`` (the others shared) and inputs ``[T, N, *x]``."""
        return per_task_call(self._inner_model(), params, x, strategy=strategy)

    # ------------------------------------------------------------------ adaptation
    def adapt(self, episode: Episode) -> Params:
        """The adapted weights of every task, ``{name: [T, *shape]}``, differentiable if grad mode is on."""
        if self.resolved_strategy() == "loop" and episode.num_tasks > 1:
            per_task = [self.adapt(one) for one in _single_tasks(episode)]
            return {k: torch.cat([adapted[k] for adapted in per_task]) for k in per_task[0]}
        differentiable = torch.is_grad_enabled()
        init, _ = self.initial_params()
        opt = self.optimizer()
        ys, kind = episode.y_support, episode.kind
        if self.steps == 0 or episode.num_support == 0:
            return {k: v.expand(episode.num_tasks, *v.shape) for k, v in init.items()}
        xs = self._body(episode.x_support)
        with torch.enable_grad():
            strategy = self.resolved_strategy()
            if strategy == "vmap":
                adapted = self._adapt_vmap(init, opt, xs, ys, kind, differentiable)
            else:
                adapted = self._adapt_batched(init, opt, xs, ys, kind, differentiable, strategy)
        return adapted if differentiable else _detached(adapted)

    def _adapt_batched(self, init: Params, opt: GradientTransformation, xs: Tensor, ys: Tensor, kind: EpisodeKind,
                       differentiable: bool, strategy: str) -> Params:
        num_tasks = xs.shape[0]
        params = {k: v.expand(num_tasks, *v.shape) for k, v in init.items()}
        if self.elementwise_optimizer():  # the update of [T, ...] weights is the per-task update
            state, update = opt.init(init), lambda g, s, p, loss: opt.update(g, s, p, loss=loss)
        else:
            state, update = vmap(opt.init)(params), vmap(lambda g, s, p, loss: opt.update(g, s, p, loss=loss))
        per_task_loss = vmap(kind.loss)

        def summed_loss(params: Params) -> tuple[Tensor, Tensor]:
            losses = per_task_loss(self._run_tasks(params, xs, strategy), ys)  # [T]
            return losses.sum(), losses

        functional_grad = grad_and_value(summed_loss, has_aux=True)
        for step in range(self.steps):
            constant = not differentiable or self._constant_step(step)
            if torch.compiler.is_compiling():  # torch.compile differentiates torch.func's gradients, not autograd's
                grads, (_, losses) = functional_grad(params)
                grads = _detached(grads) if constant else grads
            else:  # eagerly autograd's double backward is the faster
                params = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
                total, losses = summed_loss(params)
                grads = dict(zip(params, torch.autograd.grad(total, list(params.values()), create_graph=not constant)))
            updates, state = update(grads, state, params, losses.detach())
            params = apply_updates(params, updates)
            if not differentiable:
                params, state = _detached(params), _detach_tree(state)
        return params

    def _adapt_vmap(self, init: Params, opt: GradientTransformation, xs: Tensor, ys: Tensor, kind: EpisodeKind,
                    differentiable: bool) -> Params:
        def support_loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
            return kind.loss(functional_call(self._inner_model(), params, (x,)), y)

        grad_fn = grad_and_value(support_loss)

        def adapt_one(x: Tensor, y: Tensor) -> Params:
            params, state = dict(init), opt.init(init)
            for step in range(self.steps):
                grads, loss = grad_fn(params, x, y)
                if not differentiable or self._constant_step(step):
                    grads = _detached(grads)
                updates, state = opt.update(grads, state, params, loss=loss.detach())
                params = apply_updates(params, updates)
            return params

        return vmap(adapt_one)(xs, ys)

    def _predict_higher(self, episode: Episode, differentiable: bool) -> Tensor:
        """The reference: one ``higher.innerloop_ctx`` per task."""
        higher = _import_higher()
        init, _ = self.initial_params()
        opt, kind = self.optimizer(), episode.kind
        outputs = []
        for t in range(episode.num_tasks):
            torch_opt = _HigherFunctional(list(init.items()), opt)
            with higher.innerloop_ctx(self.model, torch_opt, copy_initial_weights=False,
                                      track_higher_grads=differentiable) as (fmodel, diffopt):
                if self.init != "meta":  # a fixed start: fresh leaves that higher can differentiate the loss by
                    fmodel.update_params([p.detach().requires_grad_() for p in fmodel.parameters()])
                for step in range(self.steps if episode.num_support else 0):
                    loss = kind.loss(fmodel(episode.x_support[t]), episode.y_support[t])
                    callback = _detach_grads if self._constant_step(step) else None
                    diffopt.step(loss, grad_callback=callback)
                outputs.append(fmodel(episode.x_query[t]))
        return torch.stack(outputs)

    # ------------------------------------------------------------------ learner
    def forward(self, episode: Episode) -> Tensor:
        self.check_episode(episode)
        if self.backend == "higher":
            differentiable = torch.is_grad_enabled()
            with torch.enable_grad():
                outputs = self._predict_higher(episode, differentiable)
            outputs = outputs if differentiable else outputs.detach()
        elif self.resolved_strategy() == "loop" and episode.num_tasks > 1:  # one graph per task, as higher
            outputs = torch.cat([self._predict_func(one) for one in _single_tasks(episode)])
        else:
            outputs = self._predict_func(episode)
        return self._shape_outputs(outputs, episode)

    def check_fits(self, episode: Episode) -> None:
        """The kind, and the model's output per query against the episode's labels, on the meta device."""
        self.check_episode(episode)
        outputs = check_module_input("InnerLoop", self.model, episode.x_query[0])
        shape = episode.prediction_shape
        if outputs is not None and outputs.shape[1:].numel() != shape[2:].numel():
            raise ValueError(f"InnerLoop: the model must output {tuple(shape[2:])} per query for kind="
                             f"{episode.kind!r} episodes; got {tuple(outputs.shape[1:])}")

    def _predict_func(self, episode: Episode) -> Tensor:
        return self._run_tasks(self.adapt(episode), self._body(episode.x_query), self.resolved_strategy())

    def _shape_outputs(self, outputs: Tensor, episode: Episode) -> Tensor:
        shape = episode.prediction_shape  # [T, Q, *y], or [T, Q, num_classes] for classification
        if outputs.shape[:2] != shape[:2] or outputs.shape[2:].numel() != shape[2:].numel():
            raise ValueError(f"InnerLoop: the model must output {tuple(shape[2:])} per query for kind="
                             f"{episode.kind!r} episodes; got {tuple(outputs.shape[1:])} per task")
        return outputs.reshape(shape)

    def extra_repr(self) -> str:
        return (f"steps={self.steps}, init={self.init!r}, first_order={self.first_order}, "
                f"truncate={self.truncate}, backend={self.backend!r}, strategy={self.strategy!r}, "
                f"adapted={len(self.adapted_names)} tensors")


def _single_tasks(episode: Episode) -> list[Episode]:
    return [episode.select_tasks(slice(t, t + 1)) for t in range(episode.num_tasks)]


def _children(model: nn.Sequential, start: int, stop: int | None) -> nn.Sequential:
    """Layers ``start:stop`` of ``model`` as a plain ``nn.Sequential`` keeping their names (also for subclasses)."""
    return nn.Sequential(OrderedDict(list(model.named_children())[start:stop]))


def _frozen_prefix(model: nn.Module, adapted: Sequence[str]) -> int:
    """How many leading layers of an ``nn.Sequential`` hold no adapted weight (0 for other models).

    Their output is the same at every inner step, so the inner loop computes it once (ANIL's body).
    """
    if not isinstance(model, nn.Sequential) or not all(n.split(".", 1)[0].isdigit() for n in adapted):
        return 0
    return min(int(n.split(".", 1)[0]) for n in adapted)


def _detach_tree(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, tree)


def _detach_grads(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    return [None if g is None else g.detach() for g in grads]


# ---------------------------------------------------------------------- the higher reference
class _HigherFunctional(FunctionalOptimizer):
    """A ``FunctionalOptimizer`` type of our own, so that ``higher`` maps only it to :class:`_DiffFunctional`."""


_REGISTERED: list[bool] = []


def _import_higher() -> Any:
    """``higher``, with a differentiable optimizer registered for :class:`_HigherFunctional` (once)."""
    try:
        import higher
    except ImportError as error:  # pragma: no cover - higher is a test/benchmark dependency
        raise ValueError("InnerLoop(backend='higher') needs the `higher` package; got ImportError; "
                         "install it (pip install higher) or use backend='func'") from error
    if not _REGISTERED:
        higher.register_optim(_HigherFunctional, _differentiable_functional(higher.optim.DifferentiableOptimizer))
        _REGISTERED.append(True)
    return higher


def _differentiable_functional(base: type) -> type:
    """higher's differentiable counterpart of :class:`_HigherFunctional`: the functional update on fast weights."""

    class _DiffFunctional(base):
        def __init__(self, other: _HigherFunctional, reference_params: Any, **kwargs: Any) -> None:
            super().__init__(other, reference_params, **kwargs)
            self._transforms = list(other._optimizers)
            self._states = list(other.functional_states)
            self._loss: Tensor | None = None

        def step(self, loss: Tensor, *args: Any, **kwargs: Any) -> Any:
            self._loss = loss.detach()
            return super().step(loss, *args, **kwargs)

        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            del kwargs
            for index, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                names = group["param_names"]
                params = dict(zip(names, group["params"]))
                grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}
                updates, self._states[index] = self._transforms[index].update(
                    grads, self._states[index], params, loss=self._loss)
                group["params"] = list(apply_updates(params, updates).values())

    return _DiffFunctional


__all__ = ["InnerLoop", "INITS", "BACKENDS"]
