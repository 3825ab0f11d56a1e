"""How episode-specific a HyperTransformer's generated layers are: spread, swap test, and the recipe hook."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hypernets import HyperTransformer
from hypernets.specificity import _spread, specificity, weight_specificity
from metaopt.cli import main
from metaopt.config import ConfigError
from metaopt.episodes import Episode
from metaopt.pipelines import load
from metaopt.tasks import FewShotImages, Glyphs
from metaopt.testing import shrunk


def _episodes(num_tasks: int = 24) -> Episode:
    family = FewShotImages(Glyphs(), ways=3, shots=1, queries=4, split="test")
    return family.sample(num_tasks, family.support_size, family.query_size, generator=torch.Generator().manual_seed(0))


def _ht(generate: str = "all") -> HyperTransformer:
    torch.manual_seed(0)
    return HyperTransformer(3, 4, generate=generate, label_dim=4, image_dim=8, activation_dim=4,
                            embedder_channels=4).eval()


def test_spread_is_the_rms_standard_deviation_across_episodes_over_the_rms_weight():
    weight = torch.randn(7, 3, 2, 5, dtype=torch.float64)
    values = weight.numpy().reshape(7, -1)
    expected = np.sqrt(values.var(axis=0, ddof=1).mean()) / np.sqrt((values ** 2).mean())
    assert _spread(weight) == pytest.approx(expected, rel=1e-12)
    assert _spread(weight[:1].expand(7, 3, 2, 5)) == 0.0


def test_task_independent_conv_layers_swap_without_any_change():
    ht = _ht()
    for name, generator in ht.generator.generators.items():
        if name != "logits":  # the head writes its bias alone: the same conv layer for every episode
            torch.nn.init.zeros_(generator.head.weight)
            torch.nn.init.normal_(generator.head.bias)
    report = specificity(ht, _episodes())
    assert list(report.layers) == ["conv0", "conv1", "conv2", "conv3", "logits"]
    for name in ("conv0", "conv1", "conv2", "conv3"):
        entry = report.layers[name]
        assert entry.spread == 0.0
        assert entry.swapped.difference == 0.0 and entry.swapped.accuracy == report.accuracy
    assert report.conv_mean.difference == pytest.approx(0.0, abs=1e-7)
    assert report.layers["logits"].spread > 0  # the logits layer still reads the episode


def _loop_accuracy(ht: HyperTransformer, episode, params) -> torch.Tensor:
    """The independent reference: each episode's queries scored alone, one task at a time."""
    images, support = torch.cat([episode.x_support, episode.x_query], dim=1), episode.num_support
    with torch.no_grad():
        return torch.stack([(ht.cnn({k: v[t:t + 1] for k, v in params.items()}, images[t:t + 1],
                                    norm_examples=support)[0, support:].argmax(-1) == episode.y_query[t]).float().mean()
                            for t in range(episode.num_tasks)]).mean()


def test_swaps_and_the_mean_cnn_are_scored_against_each_episodes_own_weights():
    ht, episode = _ht(), _episodes()
    report = specificity(ht, episode, seed=3)
    with torch.no_grad():
        params = ht.generate(episode)
        forward = (ht(episode).argmax(-1) == episode.y_query).float().mean()  # the learner's own prediction
    assert report.accuracy == pytest.approx(forward.item(), abs=1e-6)
    for layer in ("conv0", "logits"):  # that layer alone (weight and bias) from the episode before
        swapped = params | {k: v.roll(1, 0) for k, v in params.items() if k.startswith(f"{layer}_")}
        entry = report.layers[layer].swapped
        assert entry.accuracy == pytest.approx(_loop_accuracy(ht, episode, swapped).item(), abs=1e-6)
        assert entry.difference == pytest.approx(entry.accuracy - report.accuracy, abs=1e-6)
        assert entry.low <= entry.difference <= entry.high
    mean = {k: (v if k.startswith("logits") else v.mean(0, keepdim=True).expand_as(v)) for k, v in params.items()}
    assert report.conv_mean.accuracy == pytest.approx(_loop_accuracy(ht, episode, mean).item(), abs=1e-6)


def test_a_logits_only_generator_reports_its_one_layer_and_no_conv_mean():
    report = specificity(_ht("logits"), _episodes(4))
    assert list(report.layers) == ["logits"] and report.conv_mean is None


def test_specificity_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="at least 2"):
        specificity(_ht(), _episodes(1))
    with pytest.raises(ValueError, match="HyperTransformer"):
        weight_specificity({"x": torch.nn.Linear(1, 1)}, None, None, None)
    with pytest.raises(ValueError, match="episodes.*>= 2"):
        weight_specificity({"ht": _ht()}, None, None, None, episodes=1)


def test_a_bad_episodes_option_is_refused_when_the_recipe_is_loaded():
    with pytest.raises(ConfigError, match=r"evaluate\[0\].*episodes.*>= 2"):
        load("hypertransformer", ["evaluate=[{_target_: hypernets.specificity.weight_specificity, episodes: 1}]"])
    load("hypertransformer", ["evaluate=[{_target_: hypernets.specificity.weight_specificity, episodes: 2}]"])


def test_the_recipe_hook_writes_the_report_and_figure_for_both_hypertransformers(tmp_path):
    assert main(["run", "hypertransformer", f"output_dir={tmp_path}", *shrunk("hypertransformer")]) == 0
    (run_dir,) = (tmp_path / "hypertransformer").iterdir()
    report = json.loads((run_dir / "weight_specificity.json").read_text())
    assert set(report) == {"ht_all_layers", "ht_logits_only"}
    assert list(report["ht_all_layers"]["layers"]) == ["conv0", "conv1", "conv2", "conv3", "logits"]
    assert report["ht_all_layers"]["episodes"] == 8 and report["ht_logits_only"]["conv_mean"] is None
    assert (run_dir / "figures" / "weight_specificity.png").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_specificity_on_cuda_matches_the_cpu():
    ht, episode = _ht(), _episodes(8)
    on_cpu, on_cuda = specificity(ht, episode), specificity(ht.cuda(), episode.to("cuda"))
    assert on_cuda.accuracy == pytest.approx(on_cpu.accuracy, abs=1e-6)
    swapped = on_cpu.layers["logits"].swapped.accuracy
    assert on_cuda.layers["logits"].swapped.accuracy == pytest.approx(swapped, abs=1e-6)
