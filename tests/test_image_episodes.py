"""Few-shot image episodes: sources, layouts, labels against the images' true classes, folders, errors."""

import csv
import random
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import draw

from conftest import generator
from metaopt.tasks import Digits, FewShotImages, Glyphs, Learn2LearnTasks, MiniImageNetFolder, OmniglotFolder
from metaopt.tasks.images import RotatedClasses, clear_pool_cache
from metaopt.tasks.images import image_files as image_files_module
from metaopt.tasks.images.glyphs import hash32, render_strokes


def find_in(candidates: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether ``image`` is (numerically) one of ``candidates`` ``[N, C, H, W]``."""
    return bool(((candidates - image).abs().flatten(1).amax(1) < 1e-6).any())


def assert_images_match_labels(family: FewShotImages, episode) -> None:
    """Every labelled, query and unlabelled image is an image of the class its (hidden) label names."""
    classes = episode.info["classes"]
    groups = [(episode.x_support, episode.y_support), (episode.x_query, episode.y_query)]
    if episode.x_unlabeled is not None:
        groups.append((episode.x_unlabeled, episode.info["unlabeled_labels"]))
    for x, y in groups:
        for t in range(episode.num_tasks):
            for image, label in zip(x[t], y[t]):
                class_images = family.source.class_images(family.split, int(classes[t, label]))
                assert find_in(class_images, image), f"task {t}: an image labelled {int(label)} is not of its class"


# ---------------------------------------------------------------------- layout and labels
@pytest.mark.parametrize("make_source", [lambda: Glyphs(), lambda: Digits()], ids=["glyphs", "digits"])
def test_same_generator_gives_same_episodes(make_source):
    family = FewShotImages(make_source(), ways=5, shots=2, queries=3, unlabeled_per_class=1)
    a, b = (family.sample(4, 10, 15, generator=generator(7)) for _ in range(2))
    c = family.sample(4, 10, 15, generator=generator(8))
    for field in ("x_support", "y_support", "x_query", "y_query", "x_unlabeled"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(a.info["classes"], b.info["classes"])
    assert not torch.equal(a.x_query, c.x_query) and not torch.equal(a.info["classes"], c.info["classes"])


def test_shapes_and_remapped_labels():
    ways, shots, queries, unlabeled = 5, 3, 4, 2
    family = FewShotImages(Glyphs(), ways, shots, queries, unlabeled_per_class=unlabeled)
    ep = family.sample(6, family.support_size, family.query_size, generator=generator())
    assert ep.kind == "classification" and ep.num_classes == ways == family.num_classes
    assert ep.x_support.shape == (6, ways * shots, 1, 28, 28) and ep.y_support.dtype == torch.long
    assert ep.x_query.shape == (6, ways * queries, 1, 28, 28) and ep.y_query.shape == (6, ways * queries)
    assert ep.x_unlabeled.shape == (6, ways * unlabeled, 1, 28, 28)
    assert ep.info["classes"].shape == (6, ways) and ep.info["unlabeled_labels"].shape == (6, ways * unlabeled)
    assert 0.0 <= ep.x_support.min() and ep.x_support.max() <= 1.0
    # the support is `shots` blocks holding each label once, so take_support(ways * k) is k-shot
    blocks = ep.y_support.view(6, shots, ways).sort(-1).values
    assert torch.equal(blocks, torch.arange(ways).expand(6, shots, ways))
    for labels, per_label in ((ep.y_query, queries), (ep.info["unlabeled_labels"], unlabeled)):
        assert torch.equal(torch.stack([torch.bincount(row, minlength=ways) for row in labels]),
                           torch.full((6, ways), per_label))
    classes = ep.info["classes"]
    assert all(len(set(row.tolist())) == ways for row in classes)  # distinct classes in a task
    # labels are a random relabelling: the smallest class id does not always get label 0
    assert len({int(row.argmin()) for row in family.sample(40, 15, 20, generator=generator(1)).info["classes"]}) > 1
    # queries are shuffled, not grouped by label
    assert not torch.equal(ep.y_query, ep.y_query.sort(-1).values)


@pytest.mark.parametrize("rotations", [False, True])
def test_every_image_belongs_to_the_class_of_its_label_digits(rotations):
    family = FewShotImages(Digits(), ways=5, shots=2, queries=3, split="train", unlabeled_per_class=1,
                           rotations=rotations)
    ep = family.sample(3, 10, 15, generator=generator(2))
    assert_images_match_labels(family, ep)
    assert int(ep.info["classes"].max()) < family.source.num_classes("train")


def test_every_image_belongs_to_the_class_of_its_label_glyphs():
    # without jitter and pose, a glyph sample is exactly its class prototype
    source = Glyphs(classes=(50, 10, 10), jitter=0.0, pose=0.0)
    family = FewShotImages(source, ways=4, shots=1, queries=3, split="val", rotations=False)
    ep = family.sample(5, 4, 12, generator=generator(3))
    prototypes = source.prototypes("val", ep.info["classes"])  # [T, ways, 1, H, W]
    for x, y in ((ep.x_support, ep.y_support), (ep.x_query, ep.y_query)):
        expected = prototypes[torch.arange(5).unsqueeze(-1), y]
        # widths still vary by ±15% per sample, so compare the inked pixels
        assert ((x > 0.5) != (expected > 0.5)).float().mean() < 0.05


def test_glyph_queries_are_nearest_to_their_own_class_prototype():
    source = Glyphs()
    family = FewShotImages(source, ways=5, shots=1, queries=10, rotations=False)
    ep = family.sample(20, 5, 50, generator=generator(4))
    prototypes = source.prototypes("train", ep.info["classes"]).flatten(2)  # [T, ways, H*W]
    distances = torch.cdist(ep.x_query.flatten(2), prototypes)  # [T, Q, ways]
    accuracy = (distances.argmin(-1) == ep.y_query).float().mean()
    assert accuracy > 0.8, f"nearest-prototype accuracy {accuracy:.2f}: labels and images disagree"


# ---------------------------------------------------------------------- glyphs
def test_glyph_classes_are_distinct_and_samples_stay_close_to_their_class():
    source = Glyphs()
    classes = torch.arange(256)
    prototypes = source.prototypes("train", classes)
    samples = source.sample("train", classes, 2, generator(5))  # [256, 2, 1, H, W]
    assert (prototypes.flatten(1).sum(-1) > 10).all(), "a class has (almost) no ink"
    assert (samples[:, 0] != samples[:, 1]).flatten(1).any(-1).all(), "samples of a class do not vary"

    def smooth(x):  # a 3x3 box blur, so a sub-pixel shift does not count as a different character
        return F.avg_pool2d(x.flatten(0, -4), 3, stride=1, padding=1).flatten(1)

    between = torch.pdist(smooth(prototypes))
    within = (smooth(samples[:, 0]) - smooth(samples[:, 1])).norm(dim=-1)
    assert between.min() > 0, "two classes drew the same character"
    assert between.mean() > 1.8 * within.mean(), (between.mean(), within.mean())
    # a jittered, posed sample is still recognisably its own character among 256
    nearest = torch.cdist(smooth(samples[:, 0]), smooth(prototypes)).argmin(-1)
    assert (nearest == classes).float().mean() > 0.9


def test_glyphs_are_deterministic_per_class_and_split_apart():
    a, b = Glyphs(), Glyphs()
    torch.testing.assert_close(a.prototypes("test", torch.arange(5)), b.prototypes("test", torch.arange(5)))
    torch.testing.assert_close(a.class_images("val", 3), b.class_images("val", 3))
    assert not torch.equal(a.prototypes("train", torch.arange(5)), a.prototypes("val", torch.arange(5)))
    assert not torch.equal(a.prototypes("train", torch.arange(5)), Glyphs(seed=1).prototypes("train", torch.arange(5)))
    assert a.class_images("val", 3).shape == (20, 1, 28, 28)
    assert sum(a.num_classes(s) for s in ("train", "val", "test")) >= 3000


def test_hash_is_a_32_bit_mix():
    keys = torch.arange(100_000)
    values = hash32(keys)
    assert values.min() >= 0 and values.max() < 2**32
    assert len(torch.unique(values)) == len(keys)  # lowbias32 is a bijection on 32-bit ints
    assert abs(values.double().mean().item() / 2**32 - 0.5) < 0.01


def test_rendered_stroke_matches_exact_distance_to_the_segment():
    size, half_width = 28, 0.08
    start, end = torch.tensor([-0.5, -0.3]), torch.tensor([0.6, 0.4])
    control = torch.stack([start + (end - start) * t for t in (0.0, 1 / 3, 2 / 3, 1.0)]).view(1, 1, 4, 2)
    image = render_strokes(control, torch.ones(1, 1, dtype=torch.bool), torch.tensor([half_width]), size)[0, 0]
    centres = (torch.arange(size) + 0.5) * (2 / size) - 1
    pixels = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1)  # (x, y) per [row, col]
    chord = end - start
    t = ((pixels - start) @ chord / chord.dot(chord)).clamp(0, 1)
    distance = (pixels - start - t.unsqueeze(-1) * chord).norm(dim=-1)
    pixel = 2 / size
    expected = ((half_width + pixel / 2 - distance) / pixel).clamp(0, 1)
    interior = (t > 0.1) & (t < 0.9)  # the Gaussian profile thins the last pixel of the caps
    assert (image - expected)[interior].abs().max() < 0.15


def test_sampling_glyph_episodes_is_fast():
    torch.set_num_threads(1)
    family = FewShotImages(Glyphs(), ways=5, shots=1, queries=15)
    family.sample(16, 5, 75, generator=generator())
    times = []
    for seed in range(3):
        start = time.perf_counter()
        family.sample(16, 5, 75, generator=generator(seed))
        times.append(time.perf_counter() - start)
    assert min(times) < 0.5, f"16 tasks of 5-way 1-shot 15-query took {min(times):.3f} s"


# ---------------------------------------------------------------------- digits and rotations
def test_digit_rotation_classes_are_exact_quarter_turns():
    digits = Digits()
    rotated = RotatedClasses(digits)
    assert rotated.num_classes("train") == 4 * digits.num_classes("train") == 24
    assert sum(rotated.num_classes(s) for s in ("train", "val", "test")) == 40
    base = digits.class_images("train", 2)
    quarter = base.transpose(-1, -2).flip(-2)  # 90° counter-clockwise, built independently of rot90
    assert torch.equal(rotated.class_images("train", 8), base)
    assert torch.equal(rotated.class_images("train", 9), quarter)
    assert torch.equal(rotated.class_images("train", 10), base.flip(-1, -2))
    assert torch.equal(rotated.class_images("train", 11), quarter.flip(-1, -2))
    assert not torch.equal(rotated.class_images("train", 10), base)


def test_digits_are_resized_and_split_by_digit():
    digits = Digits(size=20)
    images = digits.class_images("test", 0)
    assert images.shape[1:] == (1, 20, 20) and len(images) > 150
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.9
    assert [digits.num_classes(s) for s in ("train", "val", "test")] == [6, 2, 2]


def test_image_size_resizes_episodes():
    ep = FewShotImages(Digits(), 3, 1, 2, split="val", image_size=14).sample(2, 3, 6, generator=generator())
    assert ep.x_support.shape == (2, 3, 1, 14, 14) and ep.x_query.shape == (2, 6, 1, 14, 14)


# ---------------------------------------------------------------------- folders
def test_omniglot_folder_splits_decodes_and_samples(omniglot_root):
    source = OmniglotFolder(omniglot_root, size=14, val_alphabets=1)
    assert [source.num_classes(s) for s in ("train", "val", "test")] == [6, 3, 6]
    assert source.images_per_class("train") == 4
    images = source.class_images("test", 0)
    assert images.shape == (4, 1, 14, 14)
    assert images.mean() < 0.5 and images.max() > 0.9  # inverted: ink bright on a dark page
    family = FewShotImages(source, ways=5, shots=1, queries=2, split="test")
    ep = family.sample(3, 5, 10, generator=generator())
    assert ep.x_query.shape == (3, 10, 1, 14, 14)
    assert_images_match_labels(family, ep)


def test_folders_are_decoded_once_per_process(omniglot_root, monkeypatch):
    clear_pool_cache()
    calls = []
    decode = image_files_module.decode_images
    counting = lambda *args, **kwargs: calls.append(1) or decode(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr("metaopt.tasks.images.omniglot.decode_images", counting)
    first, second = OmniglotFolder(omniglot_root, val_alphabets=1), OmniglotFolder(omniglot_root, val_alphabets=1)
    family = FewShotImages(first, 2, 1, 1, split="val", rotations=False)
    family.sample(2, 2, 2, generator=generator())
    decoded = len(calls)
    assert decoded == 3  # one call per character of the split
    FewShotImages(second, 2, 1, 1, split="val").sample(4, 2, 2, generator=generator(1))
    assert len(calls) == decoded and first.pool("val") is second.pool("val")


@pytest.mark.parametrize("layout", ["folders", "csv"])
def test_miniimagenet_folder_in_both_layouts(tmp_path, layout):
    classes = {"train": 6, "val": 3, "test": 4}
    rows = {split: [] for split in classes}
    index = 0
    for split, count in classes.items():
        for c in range(count):
            wnid = f"n{index:08d}"
            for i in range(5):
                if layout == "folders":
                    (tmp_path / split / wnid).mkdir(parents=True, exist_ok=True)
                    draw(tmp_path / split / wnid / f"{wnid}_{i}.jpg", 30, "RGB", index)
                else:
                    (tmp_path / "images").mkdir(exist_ok=True)
                    draw(tmp_path / "images" / f"{wnid}{i:04d}.jpg", 30, "RGB", index)
                    rows[split].append((f"{wnid}{i:04d}.jpg", wnid))
            index += 1
    if layout == "csv":
        for split, split_rows in rows.items():
            with (tmp_path / f"{split}.csv").open("w", newline="") as handle:
                csv.writer(handle).writerows([("filename", "label"), *split_rows])
    source = MiniImageNetFolder(tmp_path, size=16)
    assert source.layout == layout
    assert [source.num_classes(s) for s in classes] == list(classes.values())
    assert source.class_images("val", 1).shape == (5, 3, 16, 16)
    family = FewShotImages(source, ways=3, shots=2, queries=2, split="test", rotations=False)
    ep = family.sample(2, 6, 6, generator=generator())
    assert ep.x_support.shape == (2, 6, 3, 16, 16)
    assert_images_match_labels(family, ep)


def test_missing_or_wrong_folders_name_the_expected_layout(tmp_path, omniglot_root):
    with pytest.raises(FileNotFoundError, match=r"does not exist[\s\S]*images_background/<alphabet>/<character>"):
        OmniglotFolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"images_background is missing"):
        OmniglotFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"neither train.csv nor a train/ folder[\s\S]*train/<wnid>"):
        MiniImageNetFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"does not exist[\s\S]*train\.csv"):
        MiniImageNetFolder(tmp_path / "nowhere")
    (tmp_path / "csv" / "images").mkdir(parents=True)
    (tmp_path / "csv" / "train.csv").write_text("filename,label\nmissing.jpg,n01\n")
    with pytest.raises(FileNotFoundError, match=r"missing.jpg \(listed in train.csv\) is missing"):
        MiniImageNetFolder(tmp_path / "csv")
    with pytest.raises(ValueError, match="val_alphabets must leave training alphabets"):
        OmniglotFolder(omniglot_root, val_alphabets=3)


# ---------------------------------------------------------------------- bad parameters
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"source": Digits(), "ways": 3, "split": "val", "rotations": False}, r"ways=3 needs 3 classes, but split"),
        ({"source": Digits(), "ways": 9, "split": "test"}, r"expected ways <= 8"),
        ({"source": Digits(), "ways": 5, "queries": 400}, r"images per class, but a class of split 'train' has only"),
        ({"source": Glyphs(), "ways": 1}, r"ways must be an int >= 2"),
        ({"source": Glyphs(), "ways": 5, "shots": 0}, r"shots must be an int >= 1"),
        ({"source": Glyphs(), "ways": 5, "split": "dev"}, r"split must be one of \('train', 'val', 'test'\)"),
        ({"source": "glyphs", "ways": 5}, r"source must be an ImageSource"),
    ],
)
def test_bad_parameters_are_refused(kwargs, fragment):
    kwargs = {"shots": 1, "queries": 5, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        FewShotImages(**kwargs)


def test_too_many_images_per_class_for_a_folder_is_refused(omniglot_root):
    with pytest.raises(ValueError, match="has only 4; expected at most 4"):
        FewShotImages(OmniglotFolder(omniglot_root, val_alphabets=1), ways=2, shots=2, queries=3)


def test_sample_sizes_must_be_ways_times_shots_and_queries():
    family = FewShotImages(Glyphs(), ways=5, shots=1, queries=15)
    with pytest.raises(ValueError, match=r"got support=10, query=75; expected support=5, query=75"):
        family.sample(2, 10, 75)


# ---------------------------------------------------------------------- learn2learn bridge
class FakeTaskset:
    """Stands in for a learn2learn TaskDataset: random classes via Python's random, like learn2learn."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor, ways: int, per_class: int) -> None:
        self.data, self.labels, self.ways, self.per_class = data, labels, ways, per_class

    def sample(self):
        chosen = random.sample(sorted(set(self.labels.tolist())), self.ways)
        index = [i for c in chosen for i in random.sample((self.labels == c).nonzero().flatten().tolist(),
                                                            self.per_class)]
        random.shuffle(index)
        return self.data[index], self.labels[index]


def test_learn2learn_bridge_lays_out_tasks_like_few_shot_images():
    labels = torch.arange(8).repeat_interleave(6)
    data = labels.view(-1, 1, 1, 1).float().expand(-1, 1, 4, 4) + 0.01 * torch.arange(48).view(-1, 1, 1, 1)
    family = Learn2LearnTasks(FakeTaskset(data, labels, ways=3, per_class=4), ways=3, shots=2, queries=2)
    python_state = random.getstate()
    a = family.sample(5, 6, 6, generator=generator(1))
    b = family.sample(5, 6, 6, generator=generator(1))
    assert random.getstate() == python_state  # the caller's random stream is untouched
    assert torch.equal(a.x_support, b.x_support) and torch.equal(a.y_query, b.y_query)
    assert a.x_support.shape == (5, 6, 1, 4, 4) and a.num_classes == 3
    for x, y in ((a.x_support, a.y_support), (a.x_query, a.y_query)):
        true_class = x[..., 0, 0, 0].floor().long()
        assert torch.equal(true_class, a.info["classes"].gather(1, y))


def test_learn2learn_bridge_refuses_tasks_of_the_wrong_shape():
    labels = torch.arange(4).repeat_interleave(3)
    family = Learn2LearnTasks(FakeTaskset(torch.zeros(12, 1, 2, 2), labels, ways=2, per_class=3), 3, 1, 1)
    with pytest.raises(ValueError, match=r"must hold 3 classes .* NWays\(n=3\) and KShots\(k=2\)"):
        family.sample(1, 3, 3)


def test_learn2learn_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)
    with pytest.raises(ImportError, match=r"make learn2learn"):
        Learn2LearnTasks.from_dataset(torch.utils.data.TensorDataset(torch.zeros(4, 1)), 2, 1, 1)


def test_learn2learn_task_dataset_to_episodes(learn2learn):
    labels = torch.arange(6).repeat_interleave(5)
    data = labels.view(-1, 1, 1, 1).float().expand(-1, 1, 3, 3).contiguous()
    family = Learn2LearnTasks.from_dataset(torch.utils.data.TensorDataset(data, labels), ways=3, shots=1, queries=2)
    ep = family.sample(4, 3, 6, generator=generator())
    assert ep.x_support.shape == (4, 3, 1, 3, 3)
    assert torch.equal(ep.x_query[..., 0, 0, 0].long(), ep.info["classes"].gather(1, ep.y_query))
    again = family.sample(4, 3, 6, generator=generator())
    assert torch.equal(ep.x_query, again.x_query)
