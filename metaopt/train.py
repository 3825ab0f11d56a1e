"""MetaTrainer: the one meta-training loop for every learner with meta-parameters.

Every step draws fresh episodes from the task family, takes the learner's loss, and updates the
meta-parameters with AdamW. Checkpoints hold everything needed to continue bit-for-bit: the
learner, the outer optimiser and its schedule, the episode generator's state and the step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, get_args

import torch
from tqdm.auto import tqdm

from metaopt.checks import non_negative_float, non_negative_int, one_of, optional, positive_float, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.log import Run
from metaopt.seeds import SeedPlan, generator
from metaopt.tasks.base import TaskFamily

logger = logging.getLogger(__name__)

Schedule = Literal["constant", "cosine"]
NonfinitePolicy = Literal["stop", "rollback"]
SCHEDULES = get_args(Schedule)
NONFINITE_POLICIES = get_args(NonfinitePolicy)
MAX_ROLLBACKS = 3


class DivergenceError(RuntimeError):
    """Meta-training produced a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """What a finished (or resumed) training run reports."""

    steps: int
    final_loss: float
    val_loss: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)


@dataclass
class Stage:
    """A quantity that grows during training: ``start``, plus ``increment`` every ``every`` steps, up to ``end``."""

    start: int = 1
    end: int = 1
    increment: int = 1
    every: int = 1000

    def __post_init__(self) -> None:
        for key in ("start", "end", "increment", "every"):
            positive_int(key, getattr(self, key), owner="curriculum stage")
        if self.end < self.start:
            raise ValueError(f"curriculum stage needs 1 <= start <= end, increment >= 1, every >= 1; got {self}")

    def at(self, step: int) -> int:
        return min(self.end, self.start + self.increment * (step // self.every))


@dataclass
class Curriculum:
    """Garg et al.'s curriculum: input dimensions and/or support size grow during training (either optional).

    ``dims`` trains on the family's ``with_active_dims``; ``support`` grows the support size up to ``support``.
    """

    dims: Optional[Stage] = None
    support: Optional[Stage] = None


@dataclass
class TrainSettings:
    """Meta-training settings of one learner (a recipe's ``train:``, with a learner's own ``train:`` on top).

    Args:
        steps, batch_size, support, query: number of outer steps; tasks per step; examples per task.
        lr, weight_decay, grad_clip, warmup_steps, schedule: the AdamW outer optimiser (``grad_clip`` None: off).
        val_every, val_tasks: validation on a fixed set of held-out episodes.
        checkpoint_every: steps between checkpoints (one is always written at the end).
        log_every: steps between metric rows.
        curriculum: see :class:`Curriculum`.
        on_nonfinite: ``stop`` raises DivergenceError; ``rollback`` reloads the last checkpoint and
            halves the learning rate (at most 3 times).
    """

    steps: int = 1000
    batch_size: int = 64
    support: int = 10
    query: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    warmup_steps: int = 0
    schedule: Schedule = "constant"
    val_every: int = 200
    val_tasks: int = 256
    checkpoint_every: int = 1000
    log_every: int = 50
    curriculum: Curriculum = field(default_factory=Curriculum)
    on_nonfinite: NonfinitePolicy = "stop"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for key in ("steps", "batch_size", "support", "query", "val_every", "val_tasks", "checkpoint_every",
                    "log_every"):
            positive_int(key, getattr(self, key), owner=owner)
        non_negative_int("warmup_steps", self.warmup_steps, owner=owner)
        positive_float("lr", self.lr, owner=owner)
        non_negative_float("weight_decay", self.weight_decay, owner=owner)
        optional(positive_float, "grad_clip", self.grad_clip, owner=owner)
        one_of("schedule", self.schedule, SCHEDULES, owner=owner)
        one_of("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES, owner=owner)
        if isinstance(self.curriculum, dict):
            self.curriculum = Curriculum(**{k: Stage(**dict(v)) if v else None for k, v in self.curriculum.items()})
        stage = self.curriculum.support
        if stage is not None and stage.end != self.support:
            raise ValueError(f"curriculum.support.end ({stage.end}) must equal support ({self.support})")

    def check_family(self, family: TaskFamily) -> None:
        """Refuse a family these settings cannot train on (a dimension curriculum needs ``with_active_dims``)."""
        if self.curriculum.dims is not None:
            family.with_active_dims(self.curriculum.dims.start)
            family.with_active_dims(self.curriculum.dims.end)


def _lr_multiplier(schedule: str, warmup_steps: int, total_steps: int):
    """Linear warm-up, then constant or cosine decay to 10% of the peak."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


class MetaTrainer:
    """Meta-trains one learner on one task family.

    Args:
        learner: the learner whose ``nn.Parameter``s are meta-trained.
        family: the task family episodes are drawn from.
        settings: steps, batch and outer-optimiser settings (:class:`TrainSettings`; defaults if None).
        **changes: any :class:`TrainSettings` field, replacing the one of ``settings``
            (``MetaTrainer(learner, family, steps=200, lr=3e-3)``).
        name: the learner's name (checkpoint sub-folder and metric prefix).
        on_validate: callables run at every validation with the trainer; the metrics they return are
            logged with the validation loss (e.g. the sensitivity cosine to an explicit learner vs step).
        seed: the run's seed; training and validation episodes come from its :class:`metaopt.seeds.SeedPlan`.
        run: where metrics and checkpoints go; None keeps everything in memory.
        progress: show a progress bar.
    """

    def __init__(
        self,
        learner: Learner,
        family: TaskFamily,
        settings: TrainSettings | None = None,
        *,
        name: str = "learner",
        on_validate: Sequence[Callable[["MetaTrainer"], dict]] = (),
        seed: int = 0,
        device: str | torch.device = "cpu",
        run: Run | None = None,
        progress: bool = True,
        **changes: object,
    ) -> None:
        settings = settings or TrainSettings()
        if not isinstance(settings, TrainSettings):
            raise ValueError(f"MetaTrainer: settings must be a TrainSettings; got {type(settings).__name__}")
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(TrainSettings)})
        if unknown:
            raise ValueError(f"MetaTrainer: unknown setting(s) {unknown}; expected TrainSettings fields")
        try:
            settings = dataclasses.replace(settings, **changes)
        except ValueError as error:
            raise ValueError(f"MetaTrainer: {error}") from error
        if not learner.is_trainable:
            raise ValueError(f"MetaTrainer: learner {name!r} has no trainable parameters; nothing to meta-train")
        settings.check_family(family)  # refuses families without a curriculum
        self.settings = settings
        self.curriculum = {key: stage for key in ("dims", "support")
                           if (stage := getattr(settings.curriculum, key)) is not None}
        self.on_validate = list(on_validate)
        self.learner = learner.to(device)
        self.family = family
        self.name = name
        self.steps, self.batch_size = settings.steps, settings.batch_size
        self.support, self.query = settings.support, settings.query
        self.grad_clip = settings.grad_clip
        self.val_every, self.checkpoint_every = settings.val_every, settings.checkpoint_every
        self.log_every = settings.log_every
        self.on_nonfinite = settings.on_nonfinite
        self.device = torch.device(device)
        self.run = run
        self.progress = progress
        self.base_lr = settings.lr
        self.optimizer = torch.optim.AdamW(learner.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_multiplier(settings.schedule, settings.warmup_steps, settings.steps)
        )
        seeds = SeedPlan(seed)
        self.generator = generator(seeds.training(name))
        self.val_episode: Episode = family.sample(
            settings.val_tasks, self.support, self.query, generator=generator(seeds.validation), device=device
        )
        self.step = 0
        self.history: list[dict] = []
        self.rollbacks = 0

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path | None:
        return None if self.run is None else self.run.checkpoint_dir / self.name

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])
        self.rollbacks = state.get("rollbacks", 0)

    def save_checkpoint(self) -> Path | None:
        """Write ``step_<N>.pt`` (atomically) and point ``latest.pt`` at it."""
        if self.checkpoint_dir is None:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        target = self.checkpoint_dir / f"step_{self.step:08d}.pt"
        tmp = target.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(target)
        return target

    @staticmethod
    def latest_checkpoint(directory: Path) -> Path | None:
        """The checkpoint with the highest step in a directory, if any."""
        found = sorted(directory.glob("step_*.pt")) if directory.exists() else []
        return found[-1] if found else None

    def resume(self) -> bool:
        """Load the latest checkpoint of this learner from the run folder; False if there is none."""
        if self.checkpoint_dir is None:
            return False
        path = self.latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
        logger.info("resumed %s from %s (step %d)", self.name, path, self.step)
        return True

    # ------------------------------------------------------------------ loop
    @torch.no_grad()
    def validate(self) -> float:
        was_training = self.learner.training
        self.learner.eval()
        loss = self.learner.loss(self.val_episode).item()
        self.learner.train(was_training)
        return loss

    def _handle_nonfinite(self, loss: torch.Tensor) -> None:
        last = self.latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        message = (
            f"{self.name}: non-finite loss or gradient ({loss.item()}) at step {self.step}. "
            "Lower train.lr, set train.grad_clip, or use train.on_nonfinite=rollback."
        )
        if self.on_nonfinite == "rollback" and last is not None and self.rollbacks < MAX_ROLLBACKS:
            rollbacks = self.rollbacks + 1
            self.load_state_dict(torch.load(last, map_location=self.device, weights_only=False))
            self.rollbacks = rollbacks
            scale = 0.5**rollbacks
            self.scheduler.base_lrs = [self.base_lr * scale for _ in self.scheduler.base_lrs]
            for group, lr_lambda in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
                group["lr"] = self.base_lr * scale * lr_lambda(self.step)
            logger.warning("%s Rolled back to %s with half the learning rate.", message, last)
            self._log({"event": "rollback"})
            return
        if last is not None:
            message += f" The last good checkpoint is {last}."
        self._log({"event": "diverged"})
        raise DivergenceError(message)

    def _log(self, metrics: dict) -> None:
        metrics = {**metrics, "step": self.step}
        row = {f"{self.name}/{k}": v for k, v in metrics.items()}
        self.history.append(metrics)
        if self.run is not None:
            self.run.log(row, step=None)

    def _stage(self) -> tuple[TaskFamily, int]:
        """The task family and support size of the current step under the curriculum."""
        family, support = self.family, self.support
        if "dims" in self.curriculum:
            family = family.with_active_dims(self.curriculum["dims"].at(self.step))
        if "support" in self.curriculum:
            support = self.curriculum["support"].at(self.step)
        return family, support

    def fit(self) -> TrainResult:
        """Train until ``steps``; continue from ``self.step`` if resumed. Ctrl-C saves a checkpoint."""
        start, started_at = self.step, time.perf_counter()
        loss_value, val_loss = float("nan"), None
        self.learner.train()
        # disable=None: a bar on a terminal, plain log lines at each validation otherwise (CI, files)
        bar = tqdm(total=self.steps, initial=self.step, desc=f"train {self.name}",
                   disable=None if self.progress else True, dynamic_ncols=True, mininterval=0.5)
        try:
            while self.step < self.steps:
                # 1. fresh episodes (from the curriculum's current stage)
                family, support = self._stage()
                episode = family.sample(
                    self.batch_size, support, self.query, generator=self.generator, device=self.device
                )
                # 2. forward and meta-gradient
                loss = self.learner.loss(episode)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # 3. clip, check, step
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.learner.parameters(), self.grad_clip if self.grad_clip else float("inf")
                )
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    self._handle_nonfinite(loss)
                    continue
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                loss_value = loss.item()
                # 4. log, validate, checkpoint
                if self.step % self.log_every == 0 or self.step == self.steps:
                    self._log({"loss": loss_value, "grad_norm": grad_norm.item(),
                               "lr": self.scheduler.get_last_lr()[0]})
                if self.step % self.val_every == 0 or self.step == self.steps:
                    val_loss = self.validate()
                    extra = {}
                    for hook in self.on_validate:
                        extra.update(hook(self))
                    self._log({"val_loss": val_loss, **extra})
                    if bar.disable and self.progress:
                        logger.info("%s step %d/%d loss %.4f val %.4f (%.1f steps/s)", self.name, self.step,
                                    self.steps, loss_value, val_loss,
                                    (self.step - start) / (time.perf_counter() - started_at))
                if self.step % self.checkpoint_every == 0 or self.step == self.steps:
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{val_loss:.4f}" if val_loss is not None else "-")
        except KeyboardInterrupt:
            saved = self.save_checkpoint()
            bar.close()
            raise KeyboardInterrupt(f"interrupted at step {self.step}; checkpoint saved to {saved}") from None
        bar.close()
        seconds = time.perf_counter() - started_at
        if self.step > start:
            logger.info("%s: %d steps in %.1fs (%.1f steps/s)", self.name, self.step - start, seconds,
                        (self.step - start) / seconds)
        return TrainResult(self.step, loss_value, val_loss, seconds, self.history)
