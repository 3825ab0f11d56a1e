"""The comparison again on episodes with or without teaching sequences (Bhattamishra et al. 2024).

The paper trains with a teaching sequence at the head of the prompt half the time and evaluates with and
without it. The recipe's comparison covers one of the two (``compare.task``); :func:`compare_teaching` is an
``evaluate:`` hook that compares the same trained learners on the other, with its own claims, table and plot.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

from metaopt import compare as comparing
from metaopt.learners.base import Learner
from metaopt.log import Run
from metaopt.seeds import SeedPlan
from metaopt.tasks.boolean import BooleanFamily, teaching_probability

__all__ = ["compare_teaching"]

logger = logging.getLogger(__name__)


def compare_teaching(learners: dict[str, Learner], family: BooleanFamily, run: Run, seeds: SeedPlan,
                     support_sizes: Sequence[int], device: str = "cpu", teaching: bool | float = True,
                     num_tasks: int = 400, query: int = 4, claims: Sequence[dict] = ()) -> dict[str, Any]:
    """Compare ``learners`` on ``family`` with ``teaching`` (a bool or per-task probability) in place of its own;
    the results, table and plot are saved as ``teaching_<p>``; returns the means per learner and the claims."""
    if not isinstance(family, BooleanFamily) or not family.has_teaching:
        raise ValueError(f"compare_teaching: family must be a Boolean family with teaching sequences; got "
                         f"{type(family).__name__}")
    taught = copy.copy(family)
    taught.teaching, taught.teaching_prob = teaching, teaching_probability("compare_teaching", teaching)
    result = comparing.compare(learners, taught, support_sizes=support_sizes, num_tasks=num_tasks, query=query,
                               seed=seeds.comparison, device=device, claims=list(claims), progress=False)
    name = f"teaching_{taught.teaching_prob:g}"
    run.save_json(result.to_dict(), name)
    recipe = run.config.get("name", "")
    title = f"{recipe}, teaching sequences p = {taught.teaching_prob:g}".removeprefix(", ")
    run.save_figure(comparing.plot(result, title=title), f"{result.metric}_vs_k_{name}")
    table = comparing.format_table(result)
    logger.info("comparison with teaching=%s:\n%s", teaching, table)
    run.summary({f"{name}/{learner}/{result.metric}@k={support_sizes[-1]}": curve.mean[-1]
                 for learner, curve in result.curves.items()})
    return {"table": table, "curves": {learner: list(curve.mean) for learner, curve in result.curves.items()},
            "claims": [vars(claim) for claim in result.claims]}
