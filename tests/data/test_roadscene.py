"""Tests of the built-in RoadScene benchmark: determinism, label integrity, source roles, cache and datasets."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from densehybrid.data import _roadscene_sources as sources
from densehybrid.data import roadscene as rs
from densehybrid.errors import DatasetError

SMALL = (64, 128)
K = rs.ROADSCENE_NUM_CLASSES


@pytest.fixture(scope="module")
def small_bench() -> rs.RoadSceneBenchmark:
    return rs.RoadSceneBenchmark(seed=0, image_size=SMALL, sizes={"train": 4, "val": 4, "test": 6}).prepare()


# ---------------------------------------------------------------- constants and source roles


def test_classes_palette_and_ids() -> None:
    assert K == len(rs.ROADSCENE_CLASSES) == 10
    assert len(set(rs.ROADSCENE_CLASSES)) == K
    assert rs.ROADSCENE_ANOMALY_ID == K
    assert rs.ROADSCENE_PALETTE.shape == (K + 1, 3) and rs.ROADSCENE_PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in rs.ROADSCENE_PALETTE}) == K + 1  # every id has its own colour
    for name in ("road", "lane marking", "sidewalk", "building", "vegetation", "sky", "car", "pole", "person"):
        assert name in rs.ROADSCENE_CLASSES


def test_source_roles_are_pairwise_disjoint() -> None:
    roles = [set(rs.TEXTURE_SOURCES), set(rs.REAL_ANOMALY_SOURCES), set(rs.NEGATIVE_SOURCES)]
    assert all(roles)
    assert not roles[0] & roles[1] and not roles[0] & roles[2] and not roles[1] & roles[2]


def _thumbnail(picture: np.ndarray) -> np.ndarray:
    grey = Image.fromarray(np.rint(picture.mean(axis=2) * 255).astype(np.uint8)).resize((32, 32), Image.BOX)
    flat = np.asarray(grey, dtype=np.float64).ravel()
    return (flat - flat.mean()) / max(flat.std(), 1e-6)


def test_negative_pool_is_broad_and_disjoint_from_the_test_anomaly_sources_by_content() -> None:
    from skimage import data as skdata

    assert len(rs.NEGATIVE_SOURCES) >= 11
    assert not set(rs.NEGATIVE_SOURCES) & set(rs.REAL_ANOMALY_SOURCES)
    anomalies = {name: _thumbnail(sources.load_source(name)) for name in rs.REAL_ANOMALY_SOURCES}
    # the check below would catch a picture shipped twice under two names (scikit-image's `cat` is `chelsea`)
    cat = _thumbnail(np.asarray(skdata.cat(), dtype=np.float32) / 255.0)
    assert float(cat @ anomalies["chelsea"]) / cat.size > 0.99
    for name in rs.NEGATIVE_SOURCES:
        negative = _thumbnail(sources.load_source(name))
        for other, thumb in anomalies.items():
            assert float(negative @ thumb) / negative.size < 0.9, (name, other)


def test_negatives_are_jitter_crops_with_object_shaped_segments() -> None:
    from scipy import ndimage

    sizes, whole = [], []
    for i in range(24):
        image, segments = rs.generate_negative(0, i, (48, 64))
        assert image.shape == (48, 64, 3) and segments.shape == (48, 64)
        ids = np.unique(segments)
        assert 1 <= len(ids[ids > 0]) <= rs.NEGATIVE_OBJECTS[1]  # a back object may be hidden
        for obj in ids[ids > 0]:
            mask = segments == obj
            # an object, not a superpixel speckle: mostly one connected part (occluders may cut off pieces)
            parts, count = ndimage.label(mask)
            largest = np.bincount(parts.ravel())[1:].max()
            whole.append(largest >= 0.5 * mask.sum())
            sizes.append(mask.mean())
    assert np.mean(whole) > 0.8
    assert np.median(sizes) > 0.04  # objects cover a good share of the crop


def test_every_source_loads_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a bundled source tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    sources._load_source_cached.cache_clear()
    for name in rs.TEXTURE_SOURCES + rs.REAL_ANOMALY_SOURCES + rs.NEGATIVE_SOURCES:
        picture = sources.load_source(name)
        assert picture.ndim == 3 and picture.shape[2] == 3 and picture.dtype == np.float32
        assert 0.0 <= picture.min() and picture.max() <= 1.0 and picture.std() > 0.01
    with pytest.raises(ValueError, match="Expected `name` to be one of"):
        sources.load_source("lily")  # needs a download: not part of any role


def test_real_cutouts_are_object_shaped() -> None:
    for name in rs.REAL_ANOMALY_SOURCES:
        cut = sources.cutout(name)
        assert len(cut.masks) >= 2 and cut.aspect > 0
        for mask, rgb in zip(cut.masks, cut.rgbs):
            assert mask.shape == rgb.shape[:2]
            # Neither a rectangle nor a speck: the object fills only part of its box, and some box corner is
            # background.
            fill = mask.mean()
            assert 0.15 < fill < 0.95, (name, fill)
            assert not (mask[0, 0] and mask[0, -1] and mask[-1, 0] and mask[-1, -1]), name


def test_negatives_and_test_scenes_use_only_their_own_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    original = sources.load_source

    def recording(name: str) -> np.ndarray:
        loaded.append(name)
        return original(name)

    monkeypatch.setattr(sources, "load_source", recording)
    sources.texture.cache_clear()
    sources.cutout.cache_clear()
    for i in range(12):
        rs.generate_negative(0, i, (32, 32))
    assert loaded and set(loaded) <= set(rs.NEGATIVE_SOURCES)
    assert len(set(loaded)) >= 3  # negatives come from several pictures, not one

    loaded.clear()
    for i in range(6):
        rs.generate_scene(0, "test", i, SMALL)
    assert loaded and set(loaded) <= set(rs.TEXTURE_SOURCES) | set(rs.REAL_ANOMALY_SOURCES)
    assert not set(loaded) & set(rs.NEGATIVE_SOURCES)
    sources.texture.cache_clear()
    sources.cutout.cache_clear()


# ---------------------------------------------------------------- determinism


def test_same_arguments_give_identical_scenes() -> None:
    a = rs.generate_scene(7, "val", 3, SMALL)
    b = rs.generate_scene(7, "val", 3, SMALL)
    for x, y in ((a.image, b.image), (a.target, b.target), (a.family, b.family)):
        assert x.tobytes() == y.tobytes()
    assert a.anomalies == b.anomalies


def test_seed_split_and_index_change_the_scene() -> None:
    base = rs.generate_scene(0, "test", 0, SMALL).image
    assert rs.generate_scene(1, "test", 0, SMALL).image.tobytes() != base.tobytes()
    assert rs.generate_scene(0, "val", 0, SMALL).image.tobytes() != base.tobytes()
    assert rs.generate_scene(0, "test", 1, SMALL).image.tobytes() != base.tobytes()


def test_benchmark_splits_equal_generate_scene(small_bench: rs.RoadSceneBenchmark) -> None:
    data = small_bench.split("val")
    for i in (0, 3):
        scene = rs.generate_scene(0, "val", i, SMALL)
        assert data.images[i].tobytes() == scene.image.tobytes()
        assert data.targets[i].tobytes() == scene.target.tobytes()
        assert data.anomalies[i] == scene.anomalies


# ---------------------------------------------------------------- label integrity


def test_train_labels_hold_only_known_classes(small_bench: rs.RoadSceneBenchmark) -> None:
    data = small_bench.split("train")
    assert data.targets.dtype == np.uint8 and data.targets.shape == (4, *SMALL)
    assert int(data.targets.max()) < K
    assert not data.families.any()
    assert all(recs == [] for recs in data.anomalies)


@pytest.mark.parametrize("split", ["val", "test"])
def test_val_test_labels_and_anomaly_masks(small_bench: rs.RoadSceneBenchmark, split: str) -> None:
    data = small_bench.split(split)
    assert int(data.targets.max()) <= K  # every pixel a class id or the anomaly id, never ignore
    anomalous = data.targets == K
    # The family map is non-zero exactly on anomaly pixels, with a valid family id.
    assert np.array_equal(data.families > 0, anomalous)
    assert set(np.unique(data.families)) <= {0, 1, 2}
    for i, records in enumerate(data.anomalies):
        assert 1 <= len(records) <= 3
        assert anomalous[i].sum() == sum(r.pixels for r in records)
        for r in records:
            assert r.pixels >= rs.MIN_ANOMALY_PIXELS
            assert r.family in ("real", "procedural") and r.location in ("road", "beside")
            if r.family == "real":
                assert r.source in rs.REAL_ANOMALY_SOURCES
            else:
                shape, fill = r.source.split("/")
                assert shape in rs.PROCEDURAL_SHAPES and fill in rs.PROCEDURAL_FILLS
            top, left, bottom, right = r.bbox
            family_id = rs.ANOMALY_FAMILIES.index(r.family)
            box = data.families[i, top:bottom, left:right]
            assert (box == family_id).sum() == r.pixels  # the anomaly lies inside its box, whole


def test_all_classes_and_both_families_occur() -> None:
    seen = set()
    families = set()
    for i in range(12):
        seen |= set(np.unique(rs.generate_scene(0, "train", i).target).tolist())
        families |= {r.family for r in rs.generate_scene(0, "test", i, SMALL).anomalies}
    assert seen == set(range(K))
    assert families == {"real", "procedural"}


def test_scenes_are_not_colour_constant() -> None:
    # Lighting and colour jitter: the mean road colour differs clearly across scenes.
    means = []
    for i in range(8):
        scene = rs.generate_scene(0, "train", i, SMALL)
        means.append(scene.image[scene.target == 0].mean(axis=0))
    assert np.ptp(np.array(means), axis=0).max() > 30


# ---------------------------------------------------------------- cache on disk


def test_prepare_writes_a_verifiable_cache_and_reuses_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {"train": 2, "val": 1, "test": 2}
    bench = rs.RoadSceneBenchmark(tmp_path, seed=3, image_size=SMALL, sizes=sizes).prepare()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"] == {"seed": 3, "image_size": list(SMALL), "sizes": sizes, "version": 1}
    assert manifest["classes"] == list(rs.ROADSCENE_CLASSES)
    images = bench.split("test").images
    assert manifest["files"]["test"]["sha256"]["images"] == rs._sha256(images)

    # A second benchmark with the same configuration reads the cache instead of generating.
    def fail(*args, **kwargs):
        raise AssertionError("regenerated a valid cache")

    monkeypatch.setattr(rs, "_generate_split", fail)
    again = rs.RoadSceneBenchmark.from_root(tmp_path)
    assert again.is_prepared()
    assert again.split("test").images.tobytes() == images.tobytes()
    assert again.split("test").anomalies == bench.split("test").anomalies
    monkeypatch.undo()

    # Another configuration does not match the cache and regenerates it.
    other = rs.RoadSceneBenchmark(tmp_path, seed=4, image_size=SMALL, sizes=sizes)
    assert not other.is_prepared()
    other.prepare()
    assert json.loads((tmp_path / "manifest.json").read_text())["config"]["seed"] == 4


def test_same_seed_gives_identical_caches(tmp_path) -> None:
    sizes = {"train": 1, "val": 1, "test": 1}
    a = rs.RoadSceneBenchmark(tmp_path / "a", image_size=SMALL, sizes=sizes).prepare()
    b = rs.RoadSceneBenchmark(tmp_path / "b", image_size=SMALL, sizes=sizes).prepare()
    ma = json.loads(a.manifest_path.read_text())
    mb = json.loads(b.manifest_path.read_text())
    assert ma["files"] == mb["files"]


def test_corrupt_cache_is_reported(tmp_path) -> None:
    sizes = {"train": 1, "val": 1, "test": 1}
    rs.RoadSceneBenchmark(tmp_path, image_size=SMALL, sizes=sizes).prepare()
    data = dict(np.load(tmp_path / "val.npz"))
    data["targets"][0, 0, 0] ^= 1
    np.savez_compressed(tmp_path / "val.npz", **data)
    with pytest.raises(DatasetError, match="SHA-256"):
        rs.RoadSceneBenchmark.from_root(tmp_path).split("val")


def test_missing_or_foreign_root_is_reported(tmp_path) -> None:
    with pytest.raises(DatasetError, match="RoadSceneBenchmark\\(root\\).prepare"):
        rs.RoadSceneDataset(tmp_path / "nothing", "train")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DatasetError, match="empty directory"):
        rs.RoadSceneBenchmark(tmp_path, image_size=SMALL, sizes={"train": 1, "val": 1, "test": 1}).prepare()


# ---------------------------------------------------------------- datasets


def test_dataset_items(small_bench: rs.RoadSceneBenchmark) -> None:
    dataset = rs.RoadSceneDataset(small_bench, "test")
    assert len(dataset) == 6 and dataset.num_classes == K
    item = dataset[2]
    assert item["image"].shape == (3, *SMALL) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["target"].dtype == torch.int64 and item["family"].dtype == torch.int64
    assert item["name"] == "test/00002"
    raw = small_bench.split("test")
    assert torch.equal(item["target"], torch.from_numpy(raw.targets[2]).long())
    assert np.array_equal(np.rint(item["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8), raw.images[2])
    assert dataset[-1]["name"] == "test/00005"
    with pytest.raises(IndexError):
        dataset[6]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, *SMALL) and batch["target"].shape == (3, *SMALL)


def test_dataset_from_root_and_transform(tmp_path) -> None:
    rs.RoadSceneBenchmark(tmp_path, image_size=SMALL, sizes={"train": 2, "val": 1, "test": 1}).prepare()

    def flip(sample):
        return {**sample, "image": sample["image"].flip(-1), "target": sample["target"].flip(-1)}

    plain = rs.RoadSceneDataset(str(tmp_path), "train")
    flipped = rs.RoadSceneDataset(tmp_path, "train", transform=flip)
    assert torch.equal(flipped[1]["target"], plain[1]["target"].flip(-1))


def test_negatives_dataset() -> None:
    negatives = rs.RoadSceneNegatives(seed=0, size=(40, 56), length=5)
    assert len(negatives) == 5
    image, segments = negatives[1]
    assert image.shape == (3, 40, 56) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert segments.shape == (40, 56) and segments.dtype == torch.int64 and int(segments.min()) >= 0
    again_image, again_segments = rs.RoadSceneNegatives(seed=0, size=(40, 56), length=5)[1]
    assert torch.equal(image, again_image) and torch.equal(segments, again_segments)
    assert not torch.equal(image, negatives[2][0])
    counts = [int(negatives[i][1].max()) + 1 for i in range(5)]
    assert max(counts) >= 2  # segment maps have several segments to choose masks from
    with pytest.raises(IndexError):
        negatives[5]


def test_negatives_paste_into_a_scene_batch(small_bench: rs.RoadSceneBenchmark) -> None:
    from densehybrid.negatives import paste_negatives

    scenes = rs.RoadSceneDataset(small_bench, "train")
    images = torch.stack([scenes[i]["image"] for i in range(2)])
    target = torch.stack([scenes[i]["target"] for i in range(2)])
    negatives = rs.RoadSceneNegatives(size=(32, 32), length=2)
    neg = torch.stack([negatives[i][0] for i in range(2)])
    seg = torch.stack([negatives[i][1] for i in range(2)])
    out = paste_negatives(images, target, neg, seg, generator=torch.Generator().manual_seed(0))
    assert out.negative_mask.any()


# ---------------------------------------------------------------- arguments and helpers


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": "training"}, ValueError, "`split` to be one of train, val, test"),
        ({"seed": -1}, ValueError, "`seed` to be a non-negative int"),
        ({"seed": 1.5}, TypeError, "`seed` to be a non-negative int"),
        ({"index": -2}, ValueError, "`index` to be a non-negative int"),
        ({"image_size": (32, 64)}, ValueError, "at least 48 pixels"),
        ({"image_size": 64}, TypeError, "pair of ints"),
    ],
)
def test_generate_scene_rejects_bad_arguments(kwargs, error, match) -> None:
    args = {"seed": 0, "split": "train", "index": 0, "image_size": SMALL, **kwargs}
    with pytest.raises(error, match=match):
        rs.generate_scene(**args)


def test_benchmark_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="`sizes` keys among"):
        rs.RoadSceneBenchmark(sizes={"validation": 3})
    with pytest.raises(ValueError, match="sizes\\['val'\\]"):
        rs.RoadSceneBenchmark(sizes={"val": -1})
    assert rs.RoadSceneBenchmark(sizes={"val": 7}).sizes == {"train": 400, "val": 7, "test": 100}


def test_colorize_and_example_grid(tmp_path) -> None:
    target = np.array([[0, 9, 10, 255]])
    rgb = rs.colorize_roadscene(torch.from_numpy(target))
    assert rgb.shape == (1, 4, 3)
    assert np.array_equal(rgb[0, :3], rs.ROADSCENE_PALETTE[[0, 9, 10]]) and not rgb[0, 3].any()
    with pytest.raises(TypeError, match="integer ids"):
        rs.colorize_roadscene(np.zeros((2, 2)))
    path = rs.save_example_grid(tmp_path / "grid.png", rows=2, image_size=SMALL)
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] == SMALL[1] * 3 and im.size[1] > 2 * SMALL[0]


def test_cached_negatives_equal_freshly_generated_ones() -> None:
    cached = rs.RoadSceneNegatives(seed=3, size=(24, 24), length=4)
    fresh = rs.RoadSceneNegatives(seed=3, size=(24, 24), length=4, cache=False)
    for i in (0, 1, 0, 5):  # 5 wraps to 1; 0 is served from the cache the second time
        (a_img, a_seg), (b_img, b_seg) = cached[i % 4], fresh[i % 4]
        assert torch.equal(a_img, b_img) and torch.equal(a_seg, b_seg)
        assert a_seg.dtype == torch.int64
