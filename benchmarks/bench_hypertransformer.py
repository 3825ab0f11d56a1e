"""Test-time cost of writing a CNN's weights: one HyperTransformer forward pass vs 5 steps of MAML-style SGD.

Both produce per-task weights of the same target CNN (``hypernets.TargetCNN`` / ``FunctionalCNN``, 4 conv
blocks of 8 or 32 channels) for a batch of 5-way 1-shot 28×28 glyph episodes. The HyperTransformer runs as a
trained generator is deployed, under ``torch.inference_mode`` (also timed under ``torch.no_grad``); MAML's
``adapt`` runs under ``torch.no_grad`` (its inner loop needs autograd, which inference mode forbids), with its
own default strategy. The target is 12× at every batch size, one episode included: the generator runs the CNN
once, forward only, while the inner loop runs it forward and backward five times.

Measured with ``python -m benchmarks hypertransformer --threads 1`` on a shared 2-core machine (two runs, fp32
matmul 89 and 77 GFLOP/s; MAML's own times moved by up to 40% between them): width 8, 100 tasks (the batch
``metaopt compare`` evaluates): 27–29 ms vs 268–304 ms (9.1–11.3×); 16 tasks: 6.0–7.3 ms vs 43 ms (5.9–7.3×);
one task: 2.6–3.1 ms vs 15–21 ms (5.6–6.7×); width 32, 16 tasks: 15–23 ms vs 178–210 ms (9.3–11.6×). On the
same machine quiet (matmul 102 GFLOP/s) MAML ran faster and the ratios were 7.5× / 7.2× / 6.9× / 7.3×. The
encoders normalise and project the placeholder tokens once for every task and attend from them alone in their
last block (``hypernets.hypertransformer.Encoder``), and the logits of the support images are not computed:
100 tasks went from 32 ms to 27–29 ms. The target is not met yet: up to 16 tasks the generator is bound by
per-operation overhead (~1130 small ops for one episode: 12 convolutions of 20–70 µs, 27 linear layers of
~12 µs), and at 100 tasks by the grouped convolutions of the embedder, the activation features and the target
CNN. For one episode the convolutions run on torch's native kernel, faster than oneDNN's at these sizes
(``metaopt.learners.task_folding.folded_conv``). Predicting the queries as well (both learners) narrows the
ratio to 3.3–6.5×: the queries' forward pass is the same for both. ``--device cuda`` times both there.
Both report their achieved GFLOP/s and its share of the machine's fp32 matmul rate (``benchmarks.flops``): the
generator is bound by per-operation overhead, not arithmetic, so its share is small and says how far from it.

What the target asks of the arithmetic (``flop_ratio``, ``generate_rate_needed_for_target``): at width 8 the
generator does 27–30% of the adaptation's multiply-adds (``flop_ratio`` 3.7 at 16 and 100 tasks, 3.3 at one;
its image embedder and activation features are convolutions the adaptation does not run), so 12× needs it at
12 / 3.7 = 3.3× the adaptation's achieved GFLOP/s. At 100 tasks, where both are bound by their convolutions,
that is about half the machine's matmul rate (two runs: 55% and 50%, where the generator reached 22% and 30%
and the adaptation 17% and 15%); at width 32 (``flop_ratio`` 8.9) 56% and 54% (the generator: 47% and 44%).
"""

from __future__ import annotations

import copy

import torch

from benchmarks.flops import achieved, count_flops
from benchmarks.timing import best_of
from hypernets import HyperTransformer, TargetCNN
from metaopt.learners import MAML
from metaopt.tasks import FewShotImages, Glyphs


def _pair(episode, width: int) -> dict:
    ht = HyperTransformer(episode.num_classes, width).to(episode.device).eval()
    maml = MAML(TargetCNN(width, num_classes=episode.num_classes), steps=5, inner_lr=0.4).to(episode.device).eval()
    with torch.inference_mode():  # how a trained generator is deployed; MAML cannot: its inner loop needs autograd
        generate = best_of(lambda: ht.generate(episode), repeats=15)
        ht_predict = best_of(lambda: ht(episode))
    with torch.no_grad():  # the counter's module hooks fail under inference mode; the operations are the same
        generate_flop = count_flops(lambda: ht.generate(episode))
        generate_no_grad = best_of(lambda: ht.generate(episode), repeats=15)
        adapt = best_of(lambda: maml.adapt(episode), repeats=15)
        maml_predict = best_of(lambda: maml(episode))
        per_task = copy.copy(maml)  # counted task by task: torch's counter overcounts grouped convolutions
        per_task.strategy = "loop"
        adapt_flop = count_flops(lambda: per_task.adapt(episode))
    device, target = episode.device, 12.0
    return {"tasks": episode.num_tasks, "ht_generate_s": generate, "ht_generate_no_grad_s": generate_no_grad,
            "maml_5_step_adapt_s": adapt, "speedup": adapt / generate, "speedup_no_grad": adapt / generate_no_grad,
            "ht_predict_queries_s": ht_predict, "maml_predict_queries_s": maml_predict,
            "predict_speedup": maml_predict / ht_predict, "target_speedup": target,
            "ht_generate_rate": achieved(generate_flop, generate, device=device),
            "maml_5_step_adapt_rate": achieved(adapt_flop, adapt, device=device),
            # what the target asks of the arithmetic: the generator's work against the adaptation's, and the
            # rate the generator would have to reach to finish in 1/target of the adaptation's time
            "flop_ratio": adapt_flop / generate_flop,
            "generate_rate_needed_for_target": achieved(generate_flop, adapt / target, device=device)}


def run(*, device: str = "cpu") -> dict:
    family = FewShotImages(Glyphs(), ways=5, shots=1, queries=5, split="test")
    episodes = family.sample(100, family.support_size, family.query_size,
                             generator=torch.Generator().manual_seed(0)).to(device)
    return {
        "width8_100_tasks": _pair(episodes, 8),  # the batch `metaopt compare` evaluates (compare.chunk_size)
        "width8_16_tasks": _pair(episodes.select_tasks(slice(0, 16)), 8),
        "width8_1_task": _pair(episodes.select_tasks(slice(0, 1)), 8),
        "width32_16_tasks": _pair(episodes.select_tasks(slice(0, 16)), 32),
    }
