"""MetaTrainer: the one meta-training loop for every learner with meta-parameters.

Every step draws fresh episodes from the task family, takes the learner's loss, and updates the
meta-parameters with AdamW. Checkpoints hold everything needed to continue bit-for-bit: the
learner, the outer optimiser and its schedule, the episode streams' states and the step.

Under torchrun every rank trains on its share of the global meta-batch and the meta-gradients are averaged
(:mod:`metaopt.distributed`); the episodes of a step are the same whatever the number of processes
(:mod:`metaopt.streams`). The loop does not wait for the device at every step: losses and gradient norms stay
on the device and are read (and checked for non-finite values) every ``log_every`` steps, at validation and
before every checkpoint, so a checkpoint never holds a diverged state.
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

from metaopt import checkpoints, distributed
from metaopt.checks import non_negative_float, non_negative_int, one_of, optional, positive_float, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Learner
from metaopt.log import Run
from metaopt.progress import Progress
from metaopt.runtime import LossScaler, Precision, autocast, check_precision, compile_loss
from metaopt.seeds import SeedPlan, generator
from metaopt.streams import TrainingStreams
from metaopt.tasks.base import TaskFamily

logger = logging.getLogger(__name__)

Schedule = Literal["constant", "cosine"]
NonfinitePolicy = Literal["stop", "rollback"]
SCHEDULES = get_args(Schedule)
NONFINITE_POLICIES = get_args(NonfinitePolicy)
MAX_ROLLBACKS = 3
MIN_LOSS_SCALE = 2.0**-16  # fp16: a loss scale halved this far means the gradients overflow at any scale


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

    @property
    def full_at(self) -> int:
        """The first step at which the stage is at ``end``."""
        return self.every * math.ceil((self.end - self.start) / self.increment)


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
        steps, batch_size, support, query: number of outer steps; tasks per step (over all processes of a
            distributed run); examples per task.
        shards: the number of independent streams each step's tasks are drawn from (:mod:`metaopt.streams`);
            a multiple of the number of processes lets each process draw only its own share. Any value gives
            the same tasks on any number of processes.
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
    shards: int = 1
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
        for key in ("steps", "batch_size", "support", "query", "shards", "val_every", "val_tasks",
                    "checkpoint_every", "log_every"):
            positive_int(key, getattr(self, key), owner=owner)
        non_negative_int("warmup_steps", self.warmup_steps, owner=owner)
        positive_float("lr", self.lr, owner=owner)
        non_negative_float("weight_decay", self.weight_decay, owner=owner)
        optional(positive_float, "grad_clip", self.grad_clip, owner=owner)
        one_of("schedule", self.schedule, SCHEDULES, owner=owner)
        one_of("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES, owner=owner)
        if isinstance(self.curriculum, dict):
            self.curriculum = Curriculum(**{k: Stage(**dict(v)) if v else None for k, v in self.curriculum.items()})
        if self.shards > self.batch_size:
            raise ValueError(f"{owner}: shards must be <= batch_size ({self.batch_size}); got {self.shards}")
        stage = self.curriculum.support
        if stage is not None and stage.end != self.support:
            raise ValueError(f"curriculum.support.end ({stage.end}) must equal support ({self.support})")

    def unfinished_curriculum(self) -> list[str]:
        """Why ``steps`` is too few for the curriculum, one sentence per stage that does not reach its ``end``
        by the last step (empty when every stage finishes)."""
        problems = []
        for key in ("dims", "support"):
            stage = getattr(self.curriculum, key)
            if stage is None or stage.at(self.steps - 1) == stage.end:
                continue
            increments = math.ceil((stage.end - stage.start) / stage.increment)
            every = (self.steps - 1) // increments
            fix = f"train.steps >= {stage.full_at + 1}" + (f" or train.curriculum.{key}.every <= {every}" if every
                                                          else "")
            problems.append(f"{self.steps} steps are too few for curriculum.{key} to reach {stage.end}: it is at "
                            f"{stage.at(self.steps - 1)} when training ends and reaches {stage.end} only at step "
                            f"{stage.full_at}; set {fix}")
        return problems

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
        precision: ``fp32``, or ``bf16``/``fp16`` to run the learner's loss under autocast (fp16 with loss
            scaling: a step whose gradients overflow is skipped and the scale lowered, as GradScaler does).
        compile: hand the learner's loss to ``torch.compile`` (eager, with one warning, where that fails).
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
        precision: Precision = "fp32",
        compile: bool = False,
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
        self.precision = check_precision(precision, self.device)
        self.scaler = LossScaler(self.precision, self.device)
        self._loss = compile_loss(learner.loss, compile, name)
        self.run = run
        self.progress = progress
        self.base_lr = settings.lr
        self.optimizer = torch.optim.AdamW(learner.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_multiplier(settings.schedule, settings.warmup_steps, settings.steps)
        )
        seeds = SeedPlan(seed)
        self.world = distributed.world()
        self.streams = TrainingStreams(seeds, settings.batch_size, settings.shards, learner=name, current=self.world)
        # every rank holds the whole validation set (hooks read it); each scores its share of it
        self.val_episode: Episode = family.sample(
            settings.val_tasks, self.support, self.query, generator=generator(seeds.validation), device=device
        )
        if settings.val_tasks < self.world.size:
            raise ValueError(f"MetaTrainer: train.val_tasks={settings.val_tasks} is smaller than the {self.world.size} "
                             "processes; every process scores at least one validation task")
        self.val_share = distributed.share(settings.val_tasks, self.world)
        distributed.broadcast_parameters(self.learner)  # as DDP does: every rank starts from rank 0's weights
        self.step = 0
        self.history: list[dict] = []
        self.rollbacks = 0
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, grad norm]) not yet read from the device

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path | None:
        return None if self.run is None else self.run.checkpoint_dir / self.name

    def state_dict(self) -> dict:
        """Everything needed to continue bit-for-bit (a collective under torchrun: every rank calls it)."""
        return {
            "step": self.step,
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "streams": self.streams.state(),
            "scaler": self.scaler.state_dict(),
            "world_size": self.world.size,
            "torch_rng": distributed.all_gather_objects(torch.get_rng_state()),  # each rank's (dropout, ...)
            "history": self.history,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.streams.set_state(state["streams"] if "streams" in state else [state["generator"]])
        self.scaler.load_state_dict(state.get("scaler", {}))
        rng = state["torch_rng"]  # one state (a checkpoint written before the per-rank list) or one per rank
        rng = [rng] if isinstance(rng, torch.Tensor) else rng
        torch.set_rng_state(rng[self.world.rank] if len(rng) == self.world.size else rng[0])
        self.history = list(state["history"])
        self.rollbacks = state.get("rollbacks", 0)
        written_by = state.get("world_size", 1)
        if written_by != self.world.size and self.world.is_main:
            logger.warning("%s: the checkpoint at step %d was written by %d process(es); continuing on %d. The "
                           "tasks of every step are the same; the shares of the meta-batch are re-assigned.",
                           self.name, self.step, written_by, self.world.size)

    def save_checkpoint(self) -> Path | None:
        """Write ``step_<N>.pt`` atomically (rank 0; every rank must call it, the streams' states are gathered)."""
        if self.checkpoint_dir is None:
            return None
        state = self.state_dict()
        target = self.checkpoint_dir / f"step_{self.step:08d}.pt"
        if self.world.is_main:
            checkpoints.save(state, target)
        return target

    latest_checkpoint = staticmethod(checkpoints.latest)

    def _load(self, path: Path) -> None:
        """Load a checkpoint on every rank: rank 0 reads it and sends it (no shared file system needed)."""
        state = checkpoints.load(path) if self.world.is_main else None
        self.load_state_dict(distributed.broadcast_object(state))

    def _newest_readable(self) -> tuple[Path | None, dict | None]:
        return checkpoints.newest_readable(self.checkpoint_dir, owner=self.name)

    def resume(self) -> bool:
        """Load the newest readable checkpoint of this learner from the run folder; False if there is none.

        Rank 0 reads it and sends it to the other ranks."""
        if self.checkpoint_dir is None:
            return False
        path, state = self._newest_readable() if self.world.is_main else (None, None)
        path, state = distributed.broadcast_object((path, state))
        if path is None:
            return False
        self.load_state_dict(state)
        logger.info("resumed %s from %s (step %d)", self.name, path, self.step)
        return True

    # ------------------------------------------------------------------ loop
    @torch.no_grad()
    def validate(self) -> float:
        """The loss on the fixed validation episodes (each rank scores its share; the shares are averaged)."""
        was_training = self.learner.training
        self.learner.eval()
        with autocast(self.precision, self.device):
            loss = self.learner.loss(self.val_episode.select_tasks(self.val_share)).float().reshape(1)
        self.learner.train(was_training)
        distributed.all_reduce_mean_([loss], weight=(self.val_share.stop - self.val_share.start) / self.val_tasks)
        return loss.item()

    @property
    def val_tasks(self) -> int:
        return self.val_episode.num_tasks

    def _read_pending(self) -> tuple[int | None, float, float]:
        """Read the losses and gradient norms kept on the device since the last read (one synchronisation).

        Returns the first step whose loss or gradient norm is not finite (None if all are), and the latest
        loss and gradient norm.
        """
        steps = [step for step, _ in self._pending]
        values = torch.stack([v for _, v in self._pending]).cpu()
        finite = torch.isfinite(values).all(dim=1)
        first = None if bool(finite.all()) else int((~finite).nonzero()[0])
        self._pending.clear()
        if first is None and self.scaler.enabled and self.scaler.current_scale() < MIN_LOSS_SCALE:
            first = len(steps) - 1  # fp16: every step overflows; skipping them for ever would hide a divergence
        if first is None:
            return None, float(values[-1, 0]), float(values[-1, 1])
        return steps[first], float(values[first, 0]), float(values[first, 1])

    def _handle_nonfinite(self, step: int, loss: float) -> None:
        last = self.latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        last = distributed.broadcast_object(last)
        message = (
            f"{self.name}: non-finite loss or gradient ({loss}) at step {step}. "
            "Lower train.lr, set train.grad_clip, or use train.on_nonfinite=rollback."
        )
        if self.on_nonfinite == "rollback" and last is not None and self.rollbacks < MAX_ROLLBACKS:
            rollbacks = self.rollbacks + 1
            self._load(last)
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

    def _train_step(self) -> None:
        """One outer step on this rank's share of the meta-batch; the loss and gradient norm stay on the device."""
        family, support = self._stage()
        episode = self.streams.draw(family, support, self.query, self.device)
        with autocast(self.precision, self.device):
            loss = self._loss(episode)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        reported = loss.detach().float().reshape(1)
        if self.world.size > 1:  # every rank reduces the same tensors: a parameter unused here gets zeros
            for p in self.learner.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.learner.parameters() if p.grad is not None]
        distributed.all_reduce_mean_([*grads, reported], weight=self.streams.weight)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.learner.parameters(), self.grad_clip if self.grad_clip else float("inf")
        )
        skipped = self.scaler.step(self.optimizer)  # fp16: an overflowing step is skipped, not a divergence
        self.scaler.update()
        grad_norm = torch.where(skipped > 0, torch.zeros_like(grad_norm), grad_norm.float())
        self._pending.append((self.step, torch.stack([reported[0], grad_norm])))
        self.scheduler.step()
        self.step += 1

    def fit(self) -> TrainResult:
        """Train until ``steps``; continue from ``self.step`` if resumed. Ctrl-C saves a checkpoint."""
        start, started_at = self.step, time.perf_counter()
        loss_value, val_loss = float("nan"), None
        self.learner.train()
        # a bar on a terminal; otherwise (CI, files, a notebook) log lines at each validation and every minute
        bar = Progress(self.steps, f"train {self.name}", enabled=self.progress and self.world.is_main,
                       unit="step", initial=self.step, every=60.0)
        before = None

        def recover(bad: int, loss: float) -> None:
            self._handle_nonfinite(bad, loss)  # raises unless it rolled back
            bar.restart(self.step)

        try:
            while self.step < self.steps:
                before = (self.step, self.streams.local_state(), torch.get_rng_state())  # undoes an unfinished step
                try:
                    self._train_step()
                except Exception:  # a non-finite step not yet read may make the next one raise (e.g. Cholesky)
                    if not self._pending:
                        raise
                    bad, loss_value, _ = self._read_pending()
                    if bad is None:
                        raise
                    recover(bad, loss_value)
                    continue
                validating = self.step % self.val_every == 0 or self.step == self.steps
                checkpointing = self.step % self.checkpoint_every == 0 or self.step == self.steps
                if not (self.step % self.log_every == 0 or validating or checkpointing):
                    bar.update()
                    continue
                bad, loss_value, grad_norm = self._read_pending()
                if bad is not None:
                    recover(bad, loss_value)
                    continue
                if self.step % self.log_every == 0 or self.step == self.steps:
                    self._log({"loss": loss_value, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]})
                if validating:
                    val_loss = self.validate()
                    extra = {}
                    for hook in self.on_validate:
                        extra.update(hook(self))
                    self._log({"val_loss": val_loss, **extra})
                    if bar.logs:
                        logger.info("%s step %d/%d loss %.4f val %.4f (%.1f steps/s)", self.name, self.step,
                                    self.steps, loss_value, val_loss,
                                    (self.step - start) / (time.perf_counter() - started_at))
                if checkpointing:
                    self.save_checkpoint()
                bar.update(loss=f"{loss_value:.4f}", val=f"{val_loss:.4f}" if val_loss is not None else "-")
        except KeyboardInterrupt:
            bar.close()
            raise KeyboardInterrupt(self._save_on_interrupt(before)) from None
        bar.close()
        seconds = time.perf_counter() - started_at
        if self.step > start and not bar.logs:  # (the progress lines end with the same)
            logger.info("%s: %d steps in %.1fs (%.1f steps/s)", self.name, self.step - start, seconds,
                        (self.step - start) / seconds)
        return TrainResult(self.step, loss_value, val_loss, seconds, self.history)

    def _save_on_interrupt(self, before: tuple | None) -> str:
        """Checkpoint the last completed step after Ctrl-C (the streams as they were before an unfinished step)."""
        if before is not None and before[0] == self.step:  # the interrupted step had not completed
            self.streams.restore_local(before[1])
            torch.set_rng_state(before[2])
        if self.world.size > 1:  # the other ranks may be anywhere: no collective now
            return f"interrupted at step {self.step}; resume continues from the last periodic checkpoint"
        if self._pending and self._read_pending()[0] is not None:
            return f"interrupted at step {self.step} after a non-finite loss; no checkpoint saved"
        return f"interrupted at step {self.step}; checkpoint saved to {self.save_checkpoint()}"
