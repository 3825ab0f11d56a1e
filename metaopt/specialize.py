"""``metaopt.optimizers_for(model, data, loss)``: a specialized optimizer meta-trained for a user's own model.

    opt = metaopt.optimizers_for(model, loader, F.cross_entropy, horizon=200, save_to="mixture.pt")
    for x, y in loader:                       # an ordinary training loop
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)                   # opt.step() works too: the loss features hold a running estimate

The steps are those of the ``optimizer`` pipeline (Kristiansen et al. 2024), on one environment:

1. an environment from the model and the data (:meth:`optimizers.Environment.from_module`); its runs start from
   the model's current weights (a pretrained model), or from fresh initialisations made by ``init``;
2. Adam's learning rate grid-tuned on it at the horizon (:func:`metaopt.pipelines.optimizer.tune_learning_rate`),
   which becomes the Adam direction's base rate, so the mixture (``α_0`` = 1 on Adam) starts as tuned Adam;
3. a :class:`optimizers.LayerwiseMixture` with one layer per module of the model, meta-trained by the estimator
   (antithetic ES by default) for ``steps`` meta-steps (:func:`metaopt.pipelines.optimizer.meta_train`);
4. the mixture as a ``torch.optim.Optimizer`` over ``model.named_parameters()``; ``save_to`` writes it as one
   file (:func:`optimizers.save`) with these settings and the meta-training metrics, for ``optimizers.load``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

import optimizers as O
from metaopt.pipelines.optimizer import meta_train, tune_learning_rate
from metaopt.progress import Progress, console_by_default
from metaopt.seeds import SeedPlan, generator

__all__ = ["ADAM_GRID", "optimizers_for"]

ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
"""The learning rates tried for Adam (the bundled recipe's grid)."""
DEFAULT_ESTIMATOR = "AntitheticES(sigma=0.01, pairs=4, batch_runs=None)"
"""The meta-gradient estimator when none is given (as the settings saved with the optimizer name it)."""


def optimizers_for(
    model: nn.Module,
    data: Any,
    loss: str | Callable[[Tensor, Tensor], Tensor],
    *,
    horizon: int = 100,
    steps: int = 100,
    batch_size: int | None = None,
    init: Callable[[], nn.Module] | None = None,
    estimator: O.GradientEstimator | None = None,
    meta_lr: float = 1e-2,
    grad_clip: float = 1.0,
    adam_lrs: Sequence[float] = ADAM_GRID,
    tuning_seeds: int = 2,
    mixture: Mapping[str, Any] | None = None,
    seed: int = 0,
    eval_examples: int | None = 1024,
    save_to: str | os.PathLike | None = None,
    log: Callable[[dict[str, float]], None] = lambda metrics: None,
    progress: bool = True,
) -> O.FunctionalOptimizer:
    """Meta-train a :class:`optimizers.LayerwiseMixture` for ``model`` on ``data``; return it as a torch optimizer.

    Args:
        model: the module to train; the returned optimizer steps its parameters.
        data, loss, batch_size: as :meth:`optimizers.Environment.from_module` takes them.
        horizon: the training length ``T`` the rule is meta-trained for (its progress feature is ``t/T``).
        steps: meta-training steps.
        init: a function making a freshly initialised model per meta-training run (default: every run starts from
            ``model``'s current weights).
        estimator: the meta-gradient estimator (default ``AntitheticES(sigma=0.01, pairs=4, batch_runs=None)``, its
            8 inner runs vmapped together; ``FullBackprop``, ``TruncatedBackprop`` and ``PES`` work too). Batching
            pays off for small models (1.5x for the digits CNN on 2 CPU cores) and loses where one run already
            fills the machine or, on CPU, for fused attention (``scaled_dot_product_attention`` has no batching
            rule there): give such models ``AntitheticES(..., batch_runs=1)``.
        meta_lr, grad_clip: the outer Adam's learning rate and gradient-norm clip.
        adam_lrs, tuning_seeds: the grid Adam's learning rate is tuned on, and the seeds per rate.
        mixture: further arguments of ``LayerwiseMixture`` (``directions``, ``initial``, ``embedding_dim``, ...).
        seed: derives every seed (tuning, meta-training).
        eval_examples: Adam is tuned on the training loss of this many examples (a fixed random subset; ``None``:
            all): measuring a large set after every tuning step would cost more than the meta-training.
        save_to: a path to write the trained optimizer to (one file, :func:`optimizers.save`).
        log: called with each meta-step's metrics (``meta_step``, ``meta_loss``, ...).
        progress: show the tuning and meta-training progress (a bar on a terminal, log lines elsewhere).

    Raises:
        ValueError: settings out of range (named), or data/loss the environment refuses.
    """
    settings = {
        "horizon": horizon, "steps": steps, "batch_size": batch_size, "meta_lr": meta_lr, "grad_clip": grad_clip,
        "adam_lrs": [float(lr) for lr in adam_lrs], "tuning_seeds": tuning_seeds, "seed": seed,
        "eval_examples": eval_examples,
        "fresh_init": init is not None, "mixture": dict(mixture or {}),
        "estimator": type(estimator).__name__ if estimator is not None else DEFAULT_ESTIMATOR,
    }
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be the nn.Module to train; got {type(model).__name__} (a factory of fresh "
                         "initialisations goes in init=)")
    if not adam_lrs:
        raise ValueError("adam_lrs is empty; give at least one learning rate to tune Adam on")
    for name in ("steps", "tuning_seeds"):
        if not isinstance(settings[name], int) or settings[name] < 1:
            raise ValueError(f"{name} must be an int >= 1; got {settings[name]!r}")
    environment = O.Environment.from_module(init if init is not None else model, data, loss, horizon=horizon,
                                            batch_size=batch_size, eval_examples=eval_examples)
    seeds = SeedPlan(seed)
    start = time.perf_counter()

    # 1. tuned Adam: the base rate of the mixture's Adam direction
    with console_by_default(), Progress(len(adam_lrs) * tuning_seeds, "tune Adam", enabled=progress,
                                        unit="run") as bar:
        search = tune_learning_rate(environment, O.adam, adam_lrs, steps=horizon,
                                    seeds=[seeds.baseline_tuning(i) for i in range(tuning_seeds)],
                                    on_curve=bar.update)
    # 2. the mixture, one layer per module, starting as tuned Adam
    arguments = {"directions": ["sgd", "momentum", "adam", "rmsprop", "sign"], "initial": {"adam": 1.0},
                 "direction_kwargs": {"adam": {"eps_root": 1e-16}, "rmsprop": {"eps_root": 1e-16}},
                 **settings["mixture"]}
    arguments["base_lrs"] = {**arguments.get("base_lrs", {}), "adam": search.best}
    learned = O.LayerwiseMixture.for_parameters(model.named_parameters(), horizon=horizon, **arguments)
    # 3. meta-training
    estimator = estimator or O.AntitheticES(sigma=0.01, pairs=4, batch_runs=None)  # the 8 inner runs batched

    def log_and_show(metrics: dict[str, float]) -> None:
        log(metrics)
        bar.update(1, meta_loss=f"{metrics['meta_loss']:.4f}")

    with console_by_default(), Progress(steps, "meta-train", enabled=progress, unit="meta-step") as bar:
        losses = meta_train(learned, environment, estimator, steps=steps, lr=meta_lr, grad_clip=grad_clip,
                            generator=generator(seeds.meta_training(0)), log=log_and_show)
    # 4. a torch optimizer over the model, and the file
    if save_to is not None:
        metrics = {"tuned_adam_lr": search.best, "adam_grid": {str(k): v for k, v in search.scores.items()},
                   "first_meta_loss": losses[0], "last_meta_loss": losses[-1], "meta_losses": losses,
                   "seconds": time.perf_counter() - start}
        O.save(learned, save_to, recipe={"optimizers_for": settings}, metrics=metrics)
    return O.as_torch_optimizer(learned.optimizer(missing_loss="estimate"), model.named_parameters())
