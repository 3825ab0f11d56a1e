"""What the study pipelines (``trajectories``, ``priming``) share: claims as rows and their report lines (their
figures use :mod:`metaopt.plotting`)."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["claim_lines", "claims"]


def claims(rows: Sequence[tuple[str, float, str, bool]]) -> list[dict[str, Any]]:
    """``(text, measured, threshold, holds)`` rows as the claim records a study writes to ``results.json``."""
    return [{"text": text, "measured": float(value), "threshold": bound, "holds": bool(holds)}
            for text, value, bound, holds in rows]


def claim_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """One report line per claim: the text, the measurement, the threshold and whether it holds."""
    return [f"- {c['text']}: {c['measured']:.4f} ({c['threshold']}) -> {'holds' if c['holds'] else 'DOES NOT HOLD'}"
            for c in records]

