"""Boolean task families over {±1}^n (Bhattamishra et al., ICLR 2024).

Inputs are uniform on {±1}^n, stored as float ±1 (their code's convention: bit value 1 is +1).
Labels are the paper's {±1} mapped to {0, 1}: float ``[T, N, 1]``, episode kind ``"binary"``.
Each family samples one formula or weight vector per task, stores it in ``info`` (task dimension
first), and, where the class has one, can put its teaching sequence (Goldman & Kearns 1995) at the
head of the support set with ``teaching=True``. Everything is sampled for all tasks at once.
"""

from __future__ import annotations

import torch

from metaopt.checks import ArgumentError, boolean, positive_int, probability, sequence_of
from metaopt.episodes import Episode
from metaopt.tasks.base import TaskFamily

LiteralProbs = tuple[float, float, float]
MAX_WEIGHT = 2**24  # integer weights and thresholds stay exact in float32


# ---------------------------------------------------------------------- shared helpers
def uniform_bits(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform ±1 floats of ``shape``."""
    return torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).float().mul_(2).sub_(1)


def random_subsets(num_tasks: int, n_bits: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random ``size``-subset of the ``n_bits`` bits per task, as a 0/1 float mask ``[T, n]``."""
    order = torch.rand(num_tasks, n_bits, generator=generator).argsort(dim=1)
    mask = torch.zeros(num_tasks, n_bits)
    return mask.scatter_(1, order[:, :size], 1.0)


def random_literals(shape: tuple[int, ...], probs: LiteralProbs, generator: torch.Generator) -> torch.Tensor:
    """Literal signs of ``shape``: 0 (absent), +1 (positive), -1 (negated) with ``probs``."""
    _, positive, negated = probs
    u = torch.rand(shape, generator=generator)
    return torch.where(u < positive, 1.0, torch.where(u < positive + negated, -1.0, 0.0))


def weight_bound(owner: str, bound: object) -> int:
    """``bound`` as an int in ``[1, MAX_WEIGHT]``: the largest integer weight or threshold of a halfspace."""
    positive_int("bound", bound, owner=owner)
    if bound > MAX_WEIGHT:
        raise ArgumentError(owner, "bound", f"an int <= {MAX_WEIGHT} (weights stay exact in float32)", bound)
    return bound


def compact_rows(rows: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the valid rows of ``rows [T, R, n]`` to the front, keeping their order; also return counts ``[T]``."""
    order = (~valid).to(torch.uint8).argsort(dim=1, stable=True)
    packed = rows.gather(1, order.unsqueeze(-1).expand_as(rows))
    return packed, valid.sum(1)


def teaching_probability(owner: str, teaching: object) -> float:
    """``teaching`` (a bool, or the probability in [0, 1] of a teaching sequence per task) as a probability."""
    if isinstance(teaching, bool):
        return float(teaching)
    if not isinstance(teaching, (int, float)) or not 0 <= teaching <= 1:
        raise ArgumentError(owner, "teaching", "a bool or a probability in [0, 1]", teaching)
    return float(teaching)


# ---------------------------------------------------------------------- base family
class BooleanFamily(TaskFamily):
    """A class of Boolean functions f: {±1}^n -> {0, 1}, one function per task.

    Subclasses implement ``_functions`` (the per-task formula, as ``info``), ``_inputs`` (defaults to
    uniform ±1) and ``_labels``; classes with a teaching sequence implement ``_teaching_rows`` and
    ``max_teaching_length``.

    Args:
        n_bits: input dimension n.
        teaching: put the class's teaching sequence at the head of every support set; the length
            of each task's sequence is stored in ``info["teaching_length"]``. A probability in [0, 1]
            instead puts it at the head of each task's support set with that probability (Bhattamishra et
            al. train with teaching sequences half the time); tasks without one have length 0.
    """

    kind = "binary"
    has_teaching: bool = False

    @classmethod
    def example(cls) -> "BooleanFamily":
        return cls(n_bits=5)

    def __init__(self, n_bits: int, teaching: bool | float = False) -> None:
        name = type(self).__name__
        self.n_bits = positive_int("n_bits", n_bits, owner=name)
        self.teaching_prob = teaching_probability(name, teaching)
        if self.teaching_prob and not self.has_teaching:
            raise ValueError(
                f"{name}: teaching={teaching!r} is not available; teaching sequences are defined for "
                "Conjunction, Disjunction, SparseDisjunction, DNF/CNF (monotone=True), Parity and SparseParity"
            )
        self.teaching = teaching

    @property
    def max_teaching_length(self) -> int:
        """The longest teaching sequence of the class: the smallest support that can hold it."""
        return 0

    @property
    def task_values(self) -> int:
        return self.n_bits * (1 + self.max_teaching_length)

    @property
    def example_values(self) -> int:
        return 2 * (self.n_bits + 1)

    def _functions(self, num_tasks: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _inputs(self, info: dict[str, torch.Tensor], num_points: int, generator: torch.Generator) -> torch.Tensor:
        num_tasks = next(iter(info.values())).shape[0]
        return uniform_bits((num_tasks, num_points, self.n_bits), generator)

    def _labels(self, info: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Labels ``[T, N]`` as bool."""
        raise NotImplementedError

    def _teaching_rows(self, info: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teaching inputs ``[T, R, n]`` (the first ``length`` rows per task) and lengths ``[T]``."""
        raise NotImplementedError

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        if self.teaching_prob and support < self.max_teaching_length:
            raise ValueError(
                f"{type(self).__name__}(teaching={self.teaching!r}) needs support >= {self.max_teaching_length} "
                f"to hold the longest teaching sequence for n_bits={self.n_bits}; got support={support!r}"
            )
        info = self._functions(num_tasks, generator)
        x = self._inputs(info, support + query, generator)
        if self.teaching_prob:
            rows, length = self._teaching_rows(info)
            if self.teaching_prob < 1:  # only these draws are new: teaching=True/False episodes are unchanged
                length = torch.where(torch.rand(num_tasks, generator=generator) < self.teaching_prob, length, 0)
            rows = rows[:, :support]
            head = torch.arange(rows.shape[1]) < length[:, None]  # [T, R]
            x = x.clone()
            x[:, : rows.shape[1]] = torch.where(head[..., None], rows, x[:, : rows.shape[1]])
            info["teaching_length"] = length
        y = self._labels(info, x).float().unsqueeze(-1)
        return Episode(
            x_support=x[:, :support],
            y_support=y[:, :support],
            x_query=x[:, support:],
            y_query=y[:, support:],
            kind="binary",
            info=info,
        )


# ---------------------------------------------------------------------- normal forms
class NormalForm(BooleanFamily):
    """k-term DNF or k-clause CNF with literals ``info["literals"]`` ``[T, k, n]`` (+1, -1 negated, 0 absent).

    DNF: f(x) = OR_j AND_{i: w_ji != 0} [x_i = w_ji]. CNF: f(x) = AND_j OR_{i: w_ji != 0} [x_i = w_ji].
    Label balancing as in Bhattamishra et al.'s code: per task one term (clause) is chosen,
    ``info["forced"]`` ``[T]``, and each point is forced through it with probability ``force``
    (for a DNF its literals are made true, so the label is 1; for a CNF they are made false, label 0).

    A CNF is sampled as the dual of a DNF with the same literals: CNF_w(x) = NOT DNF_w(-x), so inputs,
    forcing and teaching sequences are built once, in DNF space, and negated for a CNF.

    Teaching sequences (Goldman & Kearns; Bhattamishra et al. Sec. 5): for one term with negations,
    two positives that satisfy the literals with every other bit -1, then +1, and one negative per
    literal (the first positive with that literal's bit flipped); for monotone terms, per term one
    positive (its bits +1, the rest -1) and one negative per bit cleared, concatenated over terms.
    Both identify the formula uniquely in its class when the terms are distinct and irredundant.
    """

    def __init__(
        self,
        n_bits: int,
        terms: int = 1,
        cnf: bool = False,
        literal_probs: LiteralProbs = (0.7, 0.15, 0.15),
        force: float = 0.3,
        monotone: bool = False,
        teaching: bool | float = False,
    ) -> None:
        name = type(self).__name__
        positive_int("terms", terms, owner=name)
        boolean("cnf", cnf, owner=name)
        boolean("monotone", monotone, owner=name)
        probs = sequence_of("literal_probs", literal_probs, probability, owner=name, length=3)
        if abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(
                f"{name}: literal_probs must be three probabilities (absent, positive, negated) summing to 1; "
                f"got {literal_probs!r}"
            )
        if monotone:  # negated literals become positive ones (the paper's TeachConjunction / TeachDNF)
            probs = (probs[0], probs[1] + probs[2], 0.0)
        self.terms = terms
        self.cnf = cnf
        self.literal_probs = probs
        self.force = probability("force", force, owner=name)
        self.monotone = monotone
        super().__init__(n_bits, teaching)
        if self.teaching_prob and terms > 1 and not monotone:
            raise ValueError(
                f"{name}: teaching=True with {terms} terms needs monotone=True: with negated literals the "
                "concatenated per-term sequences do not identify the formula (Bhattamishra et al. teach monotone DNF)"
            )

    has_teaching = True

    @property
    def max_teaching_length(self) -> int:
        if not self.monotone:
            return self.n_bits + 2
        return self.terms * (self.n_bits + 1)

    @property
    def task_values(self) -> int:  # teaching rows: one-hot flips [k, n, n]
        return self.terms * self.n_bits * (1 + (3 * self.n_bits if self.teaching_prob else 0))

    @property
    def example_values(self) -> int:
        return 2 * (self.n_bits + 1) + self.terms

    def _literals(self, num_tasks: int, generator: torch.Generator) -> torch.Tensor:
        return random_literals((num_tasks, self.terms, self.n_bits), self.literal_probs, generator)

    def _functions(self, num_tasks: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        literals = self._literals(num_tasks, generator)
        forced = torch.randint(0, self.terms, (num_tasks,), generator=generator)
        return {"literals": literals, "forced": forced}

    def _inputs(self, info: dict[str, torch.Tensor], num_points: int, generator: torch.Generator) -> torch.Tensor:
        literals, forced = info["literals"], info["forced"]
        x = uniform_bits((literals.shape[0], num_points, self.n_bits), generator)
        chosen = literals[torch.arange(literals.shape[0]), forced]  # [T, n]
        hit = torch.rand(x.shape[:2], generator=generator) < self.force  # [T, N]
        x = torch.where(hit[..., None] & (chosen[:, None] != 0), chosen[:, None], x)
        return -x if self.cnf else x

    def _labels(self, info: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        literals = info["literals"]
        x = -x if self.cnf else x
        hits = torch.einsum("tnd,tkd->tnk", x, literals)  # literals satisfied minus violated
        satisfied = hits == literals.abs().sum(-1)[:, None, :]  # every literal of term k holds
        dnf = satisfied.any(-1)
        return ~dnf if self.cnf else dnf

    def _teaching_rows(self, info: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        literals = info["literals"]  # [T, k, n]
        num_tasks, terms, n = literals.shape
        relevant = literals != 0
        # one literal per negative example, in bit order: [T, k, n] bit indices, relevant ones first
        order = (~relevant).to(torch.uint8).argsort(dim=-1, stable=True)
        flips = torch.nn.functional.one_hot(order, n).float()  # [T, k, r, n]
        flip_valid = torch.arange(n) < relevant.sum(-1, keepdim=True)  # [T, k, r]
        first = torch.where(relevant, literals, -1.0)  # [T, k, n]
        negatives = first[:, :, None, :] * (1 - 2 * flips)  # [T, k, r, n]
        if self.monotone:
            positives, pos_valid = first[:, :, None, :], torch.ones(num_tasks, terms, 1, dtype=torch.bool)
        else:
            second = torch.where(relevant, literals, 1.0)
            positives = torch.stack([first, second], dim=2)
            pos_valid = torch.ones(num_tasks, terms, 2, dtype=torch.bool)
        rows = torch.cat([positives, negatives], dim=2).flatten(1, 2)  # [T, k * (p + n), n]
        valid = torch.cat([pos_valid, flip_valid], dim=2).flatten(1, 2)
        rows, length = compact_rows(rows, valid)
        return (-rows if self.cnf else rows), length


class Conjunction(NormalForm):
    """Conjunctions of literals: each bit absent/positive/negated with 0.7/0.15/0.15, 30% of points forced positive.

    ``info["literals"]`` is ``[T, 1, n]``. With ``monotone=True`` only positive literals (0.7/0.3).
    """

    def __init__(self, n_bits: int, monotone: bool = False, teaching: bool | float = False) -> None:
        super().__init__(n_bits, 1, cnf=False, literal_probs=(0.7, 0.15, 0.15), force=0.3,
                         monotone=monotone, teaching=teaching)


class Disjunction(NormalForm):
    """Disjunctions of literals (0.7/0.15/0.15), the mirror image of ``Conjunction``: 30% of points forced negative."""

    def __init__(self, n_bits: int, monotone: bool = False, teaching: bool | float = False) -> None:
        super().__init__(n_bits, 1, cnf=True, literal_probs=(0.7, 0.15, 0.15), force=0.3,
                         monotone=monotone, teaching=teaching)


class SparseDisjunction(NormalForm):
    """Disjunctions of exactly ``k`` positive literals (k = 4 in the paper's code); 30% of points forced negative."""

    def __init__(self, n_bits: int, k: int = 4, teaching: bool | float = False) -> None:
        positive_int("k", k, owner="SparseDisjunction")
        if isinstance(n_bits, int) and k > n_bits:
            raise ValueError(f"SparseDisjunction: k must be <= n_bits={n_bits}; got k={k!r}")
        self.k = k
        super().__init__(n_bits, 1, cnf=True, literal_probs=(0.0, 1.0, 0.0), force=0.3,
                         monotone=True, teaching=teaching)

    @property
    def max_teaching_length(self) -> int:
        return self.k + 1

    def _literals(self, num_tasks: int, generator: torch.Generator) -> torch.Tensor:
        return random_subsets(num_tasks, self.n_bits, self.k, generator).unsqueeze(1)


class DNF(NormalForm):
    """``terms``-term DNF (3 in the paper), literals 0.8/0.1/0.1; 35% of points forced through one term.

    ``teaching=True`` needs ``monotone=True`` (literals 0.8/0.2, the paper's TeachDNF).
    """

    def __init__(self, n_bits: int, terms: int = 3, monotone: bool = False, teaching: bool | float = False) -> None:
        super().__init__(n_bits, terms, cnf=False, literal_probs=(0.8, 0.1, 0.1), force=0.35,
                         monotone=monotone, teaching=teaching)


class CNF(NormalForm):
    """``clauses``-clause CNF (3 in the paper), literals 0.8/0.1/0.1; 30% of points forced to falsify one clause."""

    def __init__(self, n_bits: int, clauses: int = 3, monotone: bool = False, teaching: bool | float = False) -> None:
        positive_int("clauses", clauses, owner="CNF")
        super().__init__(n_bits, clauses, cnf=True, literal_probs=(0.8, 0.1, 0.1), force=0.3,
                         monotone=monotone, teaching=teaching)


# ---------------------------------------------------------------------- thresholds
class Majority(BooleanFamily):
    """Majority of a random subset: each bit in ``info["w"]`` ``[T, n]`` with probability ``p`` (0.3);
    f(x) = [sum_{i in subset} x_i > 0] (ties and the empty subset give 0, as sign(x·w − 0.5))."""

    def __init__(self, n_bits: int, p: float = 0.3) -> None:
        self.p = probability("p", p, owner="Majority")
        super().__init__(n_bits)

    def _functions(self, num_tasks: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"w": (torch.rand(num_tasks, self.n_bits, generator=generator) < self.p).float()}

    def _labels(self, info: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("tnd,td->tn", x, info["w"]) > 0.5


class ZeroOneThreshold(BooleanFamily):
    """Sparse threshold with weights in {0, ±1} (0.7/0.15/0.15) and a threshold b in {−bound, …, bound−1} + ½:
    f(x) = [x·w > b]; ``info["w"]`` ``[T, n]`` and ``info["threshold"]`` ``[T]`` (the paper's "0-1 threshold")."""

    def __init__(self, n_bits: int, bound: int = 3) -> None:
        self.bound = weight_bound("ZeroOneThreshold", bound)
        super().__init__(n_bits)

    def _functions(self, num_tasks: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        w = random_literals((num_tasks, self.n_bits), (0.7, 0.15, 0.15), generator)
        threshold = torch.randint(-self.bound, self.bound, (num_tasks,), generator=generator).float() + 0.5
        return {"w": w, "threshold": threshold}

    def _labels(self, info: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("tnd,td->tn", x, info["w"]) > info["threshold"][:, None]


class IntegerHalfspace(BooleanFamily):
    """Halfspace with integer weights ``info["w"]`` uniform in {−bound, …, bound}^n: f(x) = [x·w > ½]."""

    def __init__(self, n_bits: int, bound: int = 3) -> None:
        self.bound = weight_bound("IntegerHalfspace", bound)
        super().__init__(n_bits)

    def _functions(self, num_tasks: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        w = torch.randint(-self.bound, self.bound + 1, (num_tasks, self.n_bits), generator=generator).float()
        return {"w": w}

    def _labels(self, info: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("tnd,td->tn", x, info["w"]) > 0.5


# ---------------------------------------------------------------------- parities
class Parity(BooleanFamily):
    """Parity of a uniformly random subset of all 2^n (``info["subset"]`` ``[T, n]``, 0/1): f(x) = XOR of the
    subset's bits, bit i being 1 when x_i = +1.

    Teaching sequence: the n unit vectors (bit i is +1, the rest −1), whose labels say which bits are in
    the subset; it identifies every parity (and so every sparse parity) uniquely.
    """

    has_teaching = True

    def __init__(self, n_bits: int, teaching: bool | float = False) -> None:
        super().__init__(n_bits, teaching)

    @property
    def max_teaching_length(self) -> int:
        return self.n_bits

    def _functions(self, num_tasks: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"subset": torch.randint(0, 2, (num_tasks, self.n_bits), generator=generator).float()}

    def _labels(self, info: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        ones = torch.einsum("tnd,td->tn", (x > 0).float(), info["subset"])
        return ones.remainder(2) == 1

    def _teaching_rows(self, info: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        num_tasks, n = info["subset"].shape
        rows = (2 * torch.eye(n) - 1).expand(num_tasks, n, n)
        return rows, torch.full((num_tasks,), n)


class SparseParity(Parity):
    """Parity of a uniformly random ``k``-subset (k = 2 in the paper); teaching sequence as for ``Parity``."""

    def __init__(self, n_bits: int, k: int = 2, teaching: bool | float = False) -> None:
        positive_int("k", k, owner="SparseParity")
        if isinstance(n_bits, int) and k > n_bits:
            raise ValueError(f"SparseParity: k must be <= n_bits={n_bits}; got k={k!r}")
        self.k = k
        super().__init__(n_bits, teaching)

    def _functions(self, num_tasks: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"subset": random_subsets(num_tasks, self.n_bits, self.k, generator)}


# ---------------------------------------------------------------------- nearest neighbour
class NearestNeighbour(BooleanFamily):
    """Labels copy the most similar earlier point (Bhattamishra et al.'s nearest-neighbour class).

    The first ``random_prefix`` points get uniform random labels (an exact repeat of an earlier point
    copies its label); every later point copies the label of the earlier point with the highest cosine
    similarity (lowest Hamming distance; the earliest on ties). A query is the point right after the
    support set: it copies its nearest support point (or is random if the support is shorter than the
    prefix). Sampled with pointer jumping, not a loop over points.
    """

    def __init__(self, n_bits: int, random_prefix: int = 10) -> None:
        self.random_prefix = positive_int("random_prefix", random_prefix, owner="NearestNeighbour")
        super().__init__(n_bits)

    def sample_values(self, num_tasks: int, support: int, query: int) -> int:
        points = support + query  # plus the similarities of every point to the support set, 2048 tasks at a time
        return num_tasks * points * 2 * (self.n_bits + 1) + (min(num_tasks, 2048) + 1) * points * support

    def _sample(self, num_tasks: int, support: int, query: int, generator: torch.Generator) -> Episode:
        x = uniform_bits((num_tasks, support + query, self.n_bits), generator)
        coins = torch.rand(num_tasks, support + query, generator=generator) < 0.5
        y = self.copy_labels(x, coins, support).float().unsqueeze(-1)
        return Episode(x[:, :support], y[:, :support], x[:, support:], y[:, support:], kind="binary")

    def copy_labels(self, x: torch.Tensor, coins: torch.Tensor, support: int, chunk: int = 2048) -> torch.Tensor:
        """Labels ``[T, S + Q]`` (bool) of points ``x`` given their own random ``coins``, in chunks of tasks."""
        return torch.cat([self._copy_labels(x[i : i + chunk], coins[i : i + chunk], support)
                          for i in range(0, x.shape[0], chunk)])

    def _copy_labels(self, x: torch.Tensor, coins: torch.Tensor, support: int) -> torch.Tensor:
        num_tasks, num_points, n = x.shape
        if support == 0:
            return coins
        position = torch.arange(num_points).clamp(max=support)  # queries sit right after the support
        earlier = torch.arange(support)[None, :] < position[:, None]  # [N, S]
        bias = torch.zeros(num_points, support).masked_fill(~earlier, -(2 * n + 1))  # hides later points
        support_t = x[:, :support].transpose(1, 2)
        parent = torch.arange(num_points).repeat(num_tasks, 1)  # [T, N]; a root points to itself
        early = position < self.random_prefix
        rows = early.nonzero().squeeze(1)
        if len(rows):  # random labels, except that an exact repeat copies the earliest copy
            dots = torch.baddbmm(bias[rows], x[:, rows], support_t)  # [T, r, S]
            repeat = dots == n
            first = repeat.to(torch.uint8).argmax(-1)
            parent[:, rows] = torch.where(repeat.any(-1), first, parent[:, rows])
        rows = (~early).nonzero().squeeze(1)
        if len(rows):  # the most similar earlier point; argmax returns the earliest on ties
            parent[:, rows] = torch.baddbmm(bias[rows], x[:, rows], support_t).argmax(-1)
        root = parent[:, :support]  # support points point to earlier support points: jump to the roots
        for _ in range(max(1, support.bit_length())):
            root = root.gather(1, root)
        support_labels = coins[:, :support].gather(1, root)
        query_parent = parent[:, support:]
        query_labels = torch.where(
            query_parent < support,
            support_labels.gather(1, query_parent.clamp(max=support - 1)),
            coins[:, support:],
        )
        return torch.cat([support_labels, query_labels], dim=1)


__all__ = [
    "BooleanFamily", "NormalForm", "Conjunction", "Disjunction", "SparseDisjunction", "DNF", "CNF",
    "Majority", "ZeroOneThreshold", "IntegerHalfspace", "Parity", "SparseParity", "NearestNeighbour",
    "uniform_bits", "random_subsets", "random_literals",
]
