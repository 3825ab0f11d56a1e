"""A specialized optimizer for a small CNN on scikit-learn's 8×8 digits (no torchvision, no download).

    python examples/digits_cnn.py            # meta-trains, compares with tuned Adam (constant, cosine), plots
    python examples/digits_cnn.py --quick    # seconds

Writes runs/examples/digits_cnn/{mixture.pt, loss_curves.png, results.json}; mixture.pt is the learned optimizer,
which any script turns into a torch optimizer with ``optimizers.load("mixture.pt", model.named_parameters())``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from _compare import Problem, arguments, compare, report


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [8, 4, 4]
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [16, 2, 2]
        nn.Flatten(), nn.Linear(64, 10),
    )


def main(argv: Sequence[str] | None = None) -> dict:
    args = arguments(__doc__.splitlines()[0], argv)
    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    if args.quick:
        problem = Problem("digits_cnn", make_cnn, x[:256], y[:256], F.cross_entropy, horizon=4, batch_size=32,
                          eval_examples=64)
        results = compare(problem, args, meta_steps=1, pairs=1, eval_seeds=1, grid=(1e-2, 3e-2))
    else:
        problem = Problem("digits_cnn", make_cnn, x, y, F.cross_entropy, horizon=60, batch_size=64)
        results = compare(problem, args, meta_steps=40, pairs=4, eval_seeds=3)
    print(report(results))
    return results


if __name__ == "__main__":
    main()
