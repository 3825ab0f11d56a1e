"""The ``optimizer`` pipeline's claims: a recipe's ``claims:`` about the loss curves it evaluated.

A claim is about one optimizer (learned or baseline) in some environments at some horizons (every one by
default) and says either or both of

- ``fewer_steps_than: [B, ...]`` (with ``by: f``, default 0): the optimizer reaches B's final loss in fewer
  steps than B itself needs to get there, and in at most ``1 - f`` of them (Kristiansen et al.'s measure of a
  specialized optimizer); a B that never reaches its own final loss (a NaN: it diverged) fails the cell;
- ``lower_loss_than: [B, ...]``: its final loss is below B's.

The curves are the means over ``evaluation.seeds`` fresh seeds, so a claim compares means; it holds when every
(environment, horizon, other optimizer) cell holds, and ``results.json`` keeps every cell.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from metaopt.config import ConfigError, settings

__all__ = ["OptimizerClaim", "check_claims", "claim_lines", "parse_claims"]


@dataclass
class OptimizerClaim:
    """A paper's claim about one ``optimizer``'s curves (see the module docstring); ``environments`` and
    ``horizons`` (labels ``T``, ``2T``, ...) restrict where it is checked (None: everywhere)."""

    text: str = ""
    optimizer: str = ""
    environments: list[str] | None = None
    horizons: list[str] | None = None
    fewer_steps_than: list[str] = field(default_factory=list)
    by: float = 0.0
    lower_loss_than: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.optimizer:
            raise ValueError("optimizer: name the learned optimizer or baseline the claim is about")
        if not (self.fewer_steps_than or self.lower_loss_than):
            raise ValueError("a claim needs fewer_steps_than or lower_loss_than (or both); it states neither")
        if isinstance(self.by, bool) or not isinstance(self.by, (int, float)) or not 0 <= self.by < 1:
            raise ValueError(f"by must be a fraction of the steps in [0, 1) (0.2: 20% fewer steps); got {self.by!r}")
        for key in ("environments", "horizons", "fewer_steps_than", "lower_loss_than"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) and v for v in value)):
                raise ValueError(f"{key} must be a list of names; got {value!r}")

    def check_names(self, optimizers: Sequence[str], baselines: Sequence[str], environments: Sequence[str],
                    horizons: Sequence[str]) -> None:
        """Refuse a name the recipe does not have, at load time (the key and what is allowed)."""
        def known(key: str, names: Sequence[str] | None, allowed: Sequence[str], what: str) -> None:
            for name in names or ():
                if name not in allowed:
                    raise ValueError(f"{key}: {name!r} is not one of the recipe's {what} {list(allowed)}")
        known("optimizer", [self.optimizer], optimizers, "optimizers (baselines and learned)")
        known("fewer_steps_than", self.fewer_steps_than, baselines, "baselines")
        known("lower_loss_than", self.lower_loss_than, optimizers, "optimizers")
        known("environments", self.environments, environments, "environments")
        known("horizons", self.horizons, horizons, "horizons")
        others = [*self.fewer_steps_than, *self.lower_loss_than]
        if self.optimizer in others:
            raise ValueError(f"optimizer {self.optimizer!r} is compared with itself")


def parse_claims(claims: Any, *, optimizers: Sequence[str], baselines: Sequence[str],
                 environments: Sequence[str], horizons: Sequence[str]) -> list[OptimizerClaim]:
    """The recipe's ``claims:`` list as :class:`OptimizerClaim` s, every name checked (``claims[i].key ...``)."""
    parsed = []
    for i, spec in enumerate(claims or ()):
        claim = settings(spec, OptimizerClaim, f"claims[{i}]")
        try:
            claim.check_names(optimizers, baselines, environments, horizons)
        except ValueError as error:
            raise ConfigError(f"claims[{i}].{error}") from error
        parsed.append(claim)
    return parsed


def check_claims(claims: Sequence[OptimizerClaim], evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claim measured on the pipeline's ``evaluation`` (``[environment][horizon]`` as ``results.json``
    holds it): its record with one cell per place and comparison, ``verdict`` and ``holds``."""
    records = []
    for claim in claims:
        cells = []
        for env, by_horizon in evaluation.items():
            if claim.environments is not None and env not in claim.environments:
                continue
            for label, result in by_horizon.items():
                if claim.horizons is not None and label not in claim.horizons:
                    continue
                rows = result["optimizers"]
                own = rows[claim.optimizer]
                for other in claim.fewer_steps_than:
                    steps = own["steps_to_baseline_final"][other]
                    needed = rows[other]["steps_to_baseline_final"][other]
                    bound = None if needed is None else (1 - claim.by) * needed
                    cells.append({"environment": env, "horizon": label, "test": "fewer_steps", "against": other,
                                  "measured": steps, "other": needed, "threshold": bound,
                                  "holds": steps is not None and bound is not None and steps < needed
                                  and steps <= bound})
                for other in claim.lower_loss_than:
                    loss, other_loss = own["final_loss"], rows[other]["final_loss"]
                    cells.append({"environment": env, "horizon": label, "test": "lower_loss", "against": other,
                                  "measured": loss, "other": other_loss, "threshold": other_loss,
                                  "holds": loss < other_loss})
        holds = bool(cells) and all(cell["holds"] for cell in cells)
        records.append(asdict(claim) | {"cells": cells, "verdict": "holds" if holds else "does not hold",
                                        "holds": holds})
    return records


def _cell_text(cell: dict[str, Any]) -> str:
    place = f"{cell['environment']}/{cell['horizon']}"
    if cell["test"] == "fewer_steps" and cell["other"] is None:
        text = f"{place}: {cell['against']} never reaches its own final loss (diverged?)"
    elif cell["test"] == "fewer_steps":
        reached = ("never reaches" if cell["measured"] is None else f"{cell['measured']} steps to")
        text = (f"{place}: {reached} {cell['against']}'s final loss ({cell['against']}: {cell['other']}, "
                f"fewer and at most {cell['threshold']:g} needed)")
    else:
        text = f"{place}: final loss {cell['measured']:.4g} vs {cell['against']} {cell['other']:.4g}"
    return text if cell["holds"] else f"{text} (fails)"


def claim_lines(records: Sequence[dict[str, Any]], seeds: int) -> list[str]:
    """The report's lines: each claim's verdict, then its cells (means over ``seeds`` evaluation seeds)."""
    lines = []
    for record in records:
        verdict = "holds" if record["holds"] else "DOES NOT HOLD"
        where = "" if record["cells"] else ", no environment and horizon matched"
        lines.append(f"- {record['text'] or record['optimizer']} -> {verdict} "
                     f"(mean{'s' if seeds > 1 else ''} of {seeds} seed{'s' if seeds > 1 else ''}{where})")
        lines += [f"    {_cell_text(cell)}" for cell in record["cells"]]
    return lines
