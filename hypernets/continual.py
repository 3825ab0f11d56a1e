"""Continual HyperTransformer (Vladymyrov, Zhmoginov & Sandler, TMLR 2024): weights that carry over from task to task.

Tasks ``1..n`` arrive one after another. The weights generated for task ``t−1`` are fed back into the
HyperTransformer, as one extra token per output channel of each layer, together with task ``t``'s support
set; the result ``θ_t`` must serve every task seen so far:

    θ_1 = HT(S_1),   θ_t = HT(S_t, θ_{t−1}).

The generated CNN outputs embeddings, not logits, so its output size stays fixed as classes accumulate.
Queries are classified by a prototypical loss (Snell et al. 2017) with task-aware prototypes: one prototype
per (task, class) pair, the mean embedding under the *current* weights ``θ_t`` of that class's support
images of that task (a prototype is recomputed from the task's few-shot support, which is kept; the
weights are never revisited). Scenarios:

- ``"task_incremental"``: a query of task τ is classified among task τ's ``ways`` prototypes;
- ``"class_incremental"``: among all ``t · ways`` prototypes of the tasks seen so far;
- ``"mini_batch"``: one task's support arrives in ``n`` pieces (``shots`` shots each); one prototype per
  class from all pieces seen so far.

The training loss averages, over steps ``t`` and tasks ``τ ≤ t``, the query cross-entropy under ``θ_t``.

Sequences are ordinary episodes: a ``FewShotImages`` episode with ``ways · n`` classes is split into ``n``
tasks of ``ways`` classes (labels ``τ·ways .. (τ+1)·ways − 1`` form task τ); for the mini-batch scenario an
episode with ``shots · n`` shots is split into ``n`` pieces. So ``MetaTrainer`` and ``metaopt compare`` use the
model as any Learner (``forward`` gives the final step's logits over all ``ways · n`` labels), and
:func:`evaluate_continual` measures the accuracy matrix ``acc[t][τ]`` on the same episodes — also for more
tasks than were seen in training (the model has nothing tied to the sequence length).

In a recipe, ``evaluate: [{_target_: hypernets.continual.evaluate_sequences, lengths: [3, 4, 5]}]`` makes
``metaopt run`` write the accuracy matrices, average accuracy, backward transfer and their heat-map /
forgetting-curve figures after the comparison.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor

from hypernets.cnn import FunctionalCNN, Params
from hypernets.hypertransformer import WeightGenerator
from metaopt import plotting
from metaopt.checks import one_of, positive_int
from metaopt.episodes import Episode
from metaopt.learners.base import Example, Learner
from metaopt.learners.protonet import prototype_logits
from metaopt.log import Run
from metaopt.seeds import SeedPlan
from metaopt.tasks.images.few_shot import FewShotImages
from metaopt.tasks.images.glyphs import Glyphs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

SCENARIOS = ("task_incremental", "class_incremental", "mini_batch")
_MASKED = -1e9  # logits of prototypes a task-incremental query may not choose (finite: no NaN in the loss)


# ---------------------------------------------------------------------- sequences of tasks from episodes
def _rows(x: Tensor, keep: Tensor) -> Tensor:
    """``x[keep]`` per task, when every task keeps the same number of examples: ``[T, n, ...]``."""
    return x[keep].view(x.shape[0], -1, *x.shape[2:])


def num_steps(episode: Episode, ways: int, scenario: str, shots: int = 1) -> int:
    """How many tasks (or support pieces, for ``mini_batch``) an episode holds."""
    if scenario == "mini_batch":
        size = ways * shots
        if episode.num_classes != ways or episode.num_support % size:
            raise ValueError(f"mini_batch sequences need a {ways}-way episode whose support is pieces of ways × "
                             f"shots = {size}; got num_classes={episode.num_classes}, support={episode.num_support}")
        return episode.num_support // size
    if episode.num_classes is None or episode.num_classes % ways:
        raise ValueError(f"a sequence of {ways}-way tasks needs an episode with a multiple of {ways} classes; got "
                         f"num_classes={episode.num_classes!r}; expected FewShotImages(ways={ways} × tasks)")
    return episode.num_classes // ways


def prefix(episode: Episode, ways: int, steps: int, scenario: str, shots: int = 1) -> Episode:
    """The first ``steps`` tasks (or support pieces) of a sequence, as one episode with their classes merged."""
    if scenario == "mini_batch":
        return episode.take_support(steps * ways * shots)
    labels = steps * ways
    support, query = episode.y_support < labels, episode.y_query < labels
    return episode.replace(x_support=_rows(episode.x_support, support), y_support=_rows(episode.y_support, support),
                           x_query=_rows(episode.x_query, query), y_query=_rows(episode.y_query, query),
                           num_classes=labels, x_unlabeled=None, info={})


def split_tasks(episode: Episode, ways: int, scenario: str = "class_incremental", shots: int = 1) -> list[Episode]:
    """The tasks of a sequence: ``ways``-way episodes with labels ``0..ways−1`` (support pieces, for mini_batch)."""
    n = num_steps(episode, ways, scenario, shots)
    if scenario == "mini_batch":
        size = ways * shots
        return [episode.replace(x_support=episode.x_support[:, t * size:(t + 1) * size],
                                y_support=episode.y_support[:, t * size:(t + 1) * size]) for t in range(n)]
    tasks = []
    for t in range(n):
        support, query = episode.y_support // ways == t, episode.y_query // ways == t
        tasks.append(Episode(_rows(episode.x_support, support), _rows(episode.y_support, support) - t * ways,
                             _rows(episode.x_query, query), _rows(episode.y_query, query) - t * ways,
                             kind="classification", num_classes=ways))
    return tasks


# ---------------------------------------------------------------------- the model
class ContinualHyperTransformer(Learner):
    """The continual HyperTransformer: ``θ_t = HT(S_t, θ_{t−1})``, prototypes in the generated CNN's embedding.

    Args:
        ways: classes per task.
        widths: the target CNN's channels; its last layer outputs ``embedding_dim`` numbers.
        embedding_dim: size of the embedding the prototypes live in.
        scenario: task_incremental, class_incremental or mini_batch (module docstring).
        shots: shots per support piece (mini_batch only: an episode with ``shots · n`` shots is ``n`` pieces).
        feedback: feed ``θ_{t−1}`` back in (False: a HyperTransformer that sees one task at a time, the baseline).
        in_channels, image_size, n_layer, n_head, label_dim, image_dim, activation_dim, embedder_channels,
        strategy: as in :class:`~hypernets.HyperTransformer`.
    """

    kinds = ("classification",)
    implicit = True

    @classmethod
    def example(cls) -> Example:
        family = FewShotImages(Glyphs((8, 4, 4), size=16, samples_per_class=4), ways=4, shots=1, queries=1,
                               rotations=False)
        return Example(cls(2, 4, embedding_dim=8, image_size=16, label_dim=4, image_dim=8, activation_dim=4,
                           embedder_channels=4), family)

    def __init__(self, ways: int = 5, widths: int | Sequence[int] = 8, *, embedding_dim: int = 32,
                 scenario: str = "class_incremental", shots: int = 1, feedback: bool = True, in_channels: int = 1,
                 image_size: int = 28, n_layer: int = 1, n_head: int = 2, label_dim: int = 16, image_dim: int = 32,
                 activation_dim: int = 16, embedder_channels: int = 16, strategy: str = "auto") -> None:
        super().__init__()
        one_of("scenario", scenario, SCENARIOS, owner="ContinualHyperTransformer")
        positive_int("shots", shots, owner="ContinualHyperTransformer")
        self.ways, self.scenario, self.shots, self.feedback = ways, scenario, shots, bool(feedback)
        cnn = FunctionalCNN(widths, in_channels=in_channels, num_classes=embedding_dim, image_size=image_size,
                            strategy=strategy)
        self.generator = WeightGenerator(cnn, ways, n_layer=n_layer, n_head=n_head, label_dim=label_dim,
                                         image_dim=image_dim, activation_dim=activation_dim,
                                         embedder_channels=embedder_channels, label_placeholders=False,
                                         feedback=self.feedback)

    @property
    def cnn(self) -> FunctionalCNN:
        return self.generator.cnn

    def tasks(self, episode: Episode) -> list[Episode]:
        self.check_episode(episode)
        return split_tasks(episode, self.ways, self.scenario, self.shots)

    def generate_sequence(self, tasks: Sequence[Episode]) -> list[Params]:
        """``[θ_1, …, θ_n]``: the weights after each task of the sequence."""
        weights: list[Params] = []
        for task in tasks:
            previous = weights[-1] if weights and self.feedback else None
            params, _ = self.generator(task.x_support, task.y_support, task.num_support, previous=previous)
            weights.append(params)
        return weights

    def logits(self, params: Params, episode: Episode) -> Tensor:
        """Query logits ``[T, Q, num_classes]`` of a merged prefix episode (``prefix``) under weights ``params``.

        The support and query images are embedded together, with batch-norm statistics of the support.
        """
        x = torch.cat([episode.x_support, episode.x_query], dim=1)
        embedded = self.cnn(params, x, norm_examples=episode.num_support)
        support, queries = embedded[:, :episode.num_support], embedded[:, episode.num_support:]
        logits = prototype_logits(support, episode.y_support, queries, episode.num_classes)
        if self.scenario == "task_incremental":  # only the query's own task's prototypes compete
            task_of_class = torch.arange(episode.num_classes, device=logits.device) // self.ways
            own = task_of_class == (episode.y_query // self.ways).unsqueeze(-1)  # [T, Q, classes]
            logits = logits.masked_fill(~own, _MASKED)
        return logits

    def forward(self, episode: Episode) -> Tensor:
        """Logits over every label of the sequence after its last task, ``[T, Q, ways · n]``."""
        return self.logits(self.generate_sequence(self.tasks(episode))[-1], episode)

    def loss(self, episode: Episode) -> Tensor:
        """Mean over steps t of the query cross-entropy of tasks 1..t under ``θ_t``."""
        weights = self.generate_sequence(self.tasks(episode))
        losses = []
        for t, params in enumerate(weights, start=1):
            seen = prefix(episode, self.ways, t, self.scenario, self.shots)
            losses.append(seen.kind.loss(self.logits(params, seen), seen.y_query))
        return torch.stack(losses).mean()


# ---------------------------------------------------------------------- evaluation
@dataclass
class ContinualResult:
    """Accuracy after each step t on each task τ ≤ t (``None`` above the diagonal), over ``num_sequences``."""

    num_tasks: int
    num_sequences: int
    accuracy: list[list[float | None]]
    average_accuracy: float
    backward_transfer: float | None


def summarize(accuracy: Tensor) -> tuple[float, float | None]:
    """Average accuracy and backward transfer of an accuracy matrix ``acc[t][τ]`` ``[n, n]`` (NaN above the diagonal).

    Average accuracy: ``mean_τ acc[n−1][τ]``, the final accuracy on every task. Backward transfer (Lopez-Paz &
    Ranzato 2017): ``mean_{τ<n−1} (acc[n−1][τ] − acc[τ][τ])``, negative when learning later tasks hurts
    earlier ones; ``None`` for a single task. A one-column matrix (mini-batch scenario: one task) has no
    backward transfer either.
    """
    n = accuracy.shape[0]
    final = accuracy[-1][~torch.isnan(accuracy[-1])]
    average = final.mean().item()
    if n < 2 or accuracy.shape[1] != n:
        return average, None
    drops = torch.stack([accuracy[-1, tau] - accuracy[tau, tau] for tau in range(n - 1)])
    return average, drops.mean().item()


@torch.no_grad()
def accuracy_matrix(learner: Learner, episode: Episode, ways: int, scenario: str, shots: int = 1) -> Tensor:
    """``acc[t][τ]`` ``[n, n]`` (``[n, 1]`` for mini_batch) of any learner that classifies a merged prefix episode.

    Step t shows the learner the support of tasks ``1..t`` (its own way: the continual HyperTransformer
    generates θ_1..θ_t in order; ProtoNet merges the support sets) and scores the queries of each task τ ≤ t.
    """
    n = num_steps(episode, ways, scenario, shots)
    columns = 1 if scenario == "mini_batch" else n
    acc = torch.full((n, columns), math.nan)
    for t in range(1, n + 1):
        seen = prefix(episode, ways, t, scenario, shots)
        correct = (learner(seen).argmax(-1) == seen.y_query).float()
        task = torch.zeros_like(seen.y_query) if scenario == "mini_batch" else seen.y_query // ways
        for tau in range(min(t, columns)):
            acc[t - 1, tau] = correct[task == tau].mean()
    return acc


def evaluate_continual(learner: Learner, family, *, ways: int, scenario: str, shots: int = 1,
                       num_sequences: int = 200, chunk_size: int = 50, seed: int = 0) -> ContinualResult:
    """The accuracy matrix, average accuracy and backward transfer over ``num_sequences`` held-out sequences.

    ``family`` samples one sequence per task of an episode (e.g. ``FewShotImages`` with ``ways · n`` classes,
    or ``shots · n`` shots for mini_batch); a family with more tasks than training saw measures extrapolation.
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = learner.training
    learner.eval()
    total, count = None, 0
    for start in range(0, num_sequences, chunk_size):
        size = min(chunk_size, num_sequences - start)
        episode = family.sample(size, family.support_size, family.query_size, generator=generator)
        acc = accuracy_matrix(learner, episode, ways, scenario, shots) * size
        total, count = (acc if total is None else total + acc), count + size
    learner.train(was_training)
    matrix = total / count
    average, backward = summarize(matrix)
    rows = [[None if math.isnan(v) else v for v in row] for row in matrix.tolist()]
    return ContinualResult(matrix.shape[0], count, rows, average, backward)


def chance(ways: int, scenario: str, num_tasks: int) -> list[float]:
    """The accuracy of guessing after each of ``num_tasks`` steps: 1/ways, or 1/(t·ways) class-incrementally."""
    one_of("scenario", scenario, SCENARIOS, owner="chance")
    if scenario == "class_incremental":
        return [1 / (ways * t) for t in range(1, num_tasks + 1)]
    return [1 / ways] * num_tasks


def plot_result(result: ContinualResult, title: str = "", chance: Sequence[float] | None = None) -> Figure:
    """The accuracy matrix as a heat map, and forgetting curves (accuracy on task τ after each step t), with the
    accuracy of guessing after each step (``chance``, see :func:`chance`) where given."""
    matrix = torch.tensor([[math.nan if v is None else v for v in row] for row in result.accuracy])
    fig, (heat, curves) = plotting.new_figure(2, panel=(5.4, 4.2))
    labels = [str(i + 1) for i in range(matrix.shape[0])]  # tasks count from 1, as on the curves
    image = plotting.heatmap(heat, matrix.numpy(), vmin=0.0, vmax=1.0, xlabels=labels, ylabels=labels, annotate=True)
    heat.set_xlabel("task τ")
    heat.set_ylabel("after learning task t")
    heat.set_title("accuracy on task τ after task t")
    plotting.colorbar(fig, image, heat, "accuracy")
    steps = list(range(1, matrix.shape[0] + 1))
    series = [plotting.Series(f"task {tau + 1}", steps[tau:], matrix[tau:, tau].tolist())
              for tau in range(matrix.shape[1])]
    plotting.plot_series(curves, series, integer_x=True, include=[0.0, 1.0] + list(chance or []))
    if chance is not None:
        plotting.chance_line(curves, chance, None if len(set(chance)) == 1 else "chance (1/(t·ways))", x=steps)
    curves.set_xlabel("tasks learned t")
    curves.set_ylabel("accuracy")
    curves.set_title("forgetting: each task's accuracy over time")
    bwt = "n/a" if result.backward_transfer is None else f"{result.backward_transfer:+.3f}"
    subtitle = (f"mean over {result.num_sequences} held-out sequences of {result.num_tasks} tasks (no interval) · "
                f"average accuracy {result.average_accuracy:.3f}, backward transfer {bwt}")
    return plotting.finish(fig, title or f"continual learning over {result.num_tasks} tasks", subtitle)


# ---------------------------------------------------------------------- entry point
def _sequence_family(family: FewShotImages, learner: ContinualHyperTransformer, num_tasks: int) -> FewShotImages:
    """The evaluation family with ``ways · num_tasks`` classes (``shots · num_tasks`` for mini_batch)."""
    if learner.scenario == "mini_batch":
        return family.replace(shots=learner.shots * num_tasks)
    return family.replace(ways=learner.ways * num_tasks)


def evaluate_sequences(
    learners: Mapping[str, Learner], family: FewShotImages, run: Run, seeds: SeedPlan, *,
    lengths: Sequence[int] | None = None, sequences: int = 200,
) -> dict[str, dict[str, dict]]:
    """Accuracy matrices of every learner on held-out task sequences: a recipe ``evaluate:`` step.

    Scores each learner on ``sequences`` sequences of each length in ``lengths`` (default: the training
    length up to 5 tasks; longer ones test extrapolation), drawn from ``family`` (the recipe's evaluation
    family, widened to hold the sequence) in the scenario of the first ``ContinualHyperTransformer``; writes
    ``continual.json`` and one heat-map/forgetting figure per learner and length to the run, and prints
    average accuracy and backward transfer.
    """
    continual = {n: m for n, m in learners.items() if isinstance(m, ContinualHyperTransformer)}
    if not continual:
        raise ValueError("evaluate_sequences needs a learner that is a hypernets.ContinualHyperTransformer")
    if not isinstance(family, FewShotImages):
        raise ValueError(f"evaluate_sequences needs a FewShotImages task family; got {type(family).__name__}")
    reference = next(iter(continual.values()))
    trained = num_steps(family.sample(1, family.support_size, family.query_size),
                        reference.ways, reference.scenario, reference.shots)
    lengths = list(lengths or range(trained, max(trained, 5) + 1))
    results: dict[str, dict[str, dict]] = {}
    for name, learner in learners.items():
        model = continual.get(name, reference)  # other learners are scored in the reference's scenario
        for n in lengths:
            sequence_family = _sequence_family(family, model, n)
            try:
                result = evaluate_continual(learner, sequence_family, ways=model.ways, scenario=model.scenario,
                                            shots=model.shots, num_sequences=sequences, seed=seeds.sequences)
            except ValueError as error:  # e.g. a fixed-ways HyperTransformer cannot read merged tasks
                logger.info("%s: no accuracy matrix (%s)", name, error)
                break
            results.setdefault(name, {})[str(n)] = asdict(result)
            run.save_figure(plot_result(result, f"{name}, {n} tasks ({model.scenario})",
                                        chance=chance(model.ways, model.scenario, n)), f"continual_{name}_{n}")
            bwt = "n/a" if result.backward_transfer is None else f"{result.backward_transfer:+.3f}"
            logger.info("%-24s tasks=%d%-15s average accuracy %.3f  backward transfer %s", name, n,
                        " (extrapolated)" if n > trained else "", result.average_accuracy, bwt)
    path = run.save_json(results, "continual")
    logger.info("accuracy matrices: %s", path)
    return results
