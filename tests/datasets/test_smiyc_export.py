"""The SMIYC writer: tree, HDF5 format, float16 warnings and the monotone squashes."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import torch

from densehybrid.errors import DenseHybridError
from densehybrid.smiyc_export import (
    FLOAT16_MAX,
    SmiycWriter,
    Squash,
    anomaly_map_path,
    float16_check,
    read_anomaly_map,
    write_anomaly_map,
)


def _scores(seed: int = 0, shape=(16, 32)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def test_file_lands_in_the_toolkit_tree_with_a_float16_value_dataset(tmp_path):
    scores = _scores()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-conditioned map and a toolkit dataset name: no warning
        path = write_anomaly_map(tmp_path, "DenseHybrid", "AnomalyTrack-all", "validation0000", scores)
    assert path == tmp_path / "anomaly_p" / "DenseHybrid" / "AnomalyTrack-all" / "validation0000.hdf5"
    assert path == anomaly_map_path(tmp_path, "DenseHybrid", "AnomalyTrack-all", "validation0000")
    with h5py.File(path, "r") as handle:
        assert list(handle.keys()) == ["value"]
        value = handle["value"]
        assert value.dtype == np.float16 and value.shape == (16, 32) and value.compression == "gzip"
        assert np.array_equal(value[()], scores.astype(np.float16))
    assert not list(path.parent.glob(".*partial"))


def test_tensors_and_integer_maps_are_accepted(tmp_path):
    scores = torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5
    path = write_anomaly_map(tmp_path, "m", "ObstacleTrack-all", "gravel_bag_1", scores)
    assert np.array_equal(read_anomaly_map(path), scores.numpy().astype(np.float16))
    path = write_anomaly_map(tmp_path, "m", "ObstacleTrack-all", "int", np.arange(6).reshape(2, 3))
    assert read_anomaly_map(path).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_bad_inputs_are_rejected(tmp_path):
    good = ("m", "AnomalyTrack-all", "f")
    with pytest.raises(ValueError, match=r"shape \(H, W\).*\(1, 16, 32\)"):
        write_anomaly_map(tmp_path, *good, _scores()[None])
    with pytest.raises(ValueError, match="NaN"):
        write_anomaly_map(tmp_path, *good, np.full((2, 2), np.nan))
    with pytest.raises(TypeError, match="real numbers"):
        write_anomaly_map(tmp_path, *good, np.ones((2, 2), dtype=bool))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        write_anomaly_map(tmp_path, *good, [[0.0]])
    with pytest.raises(ValueError, match="`frame`.*'a/b'"):
        write_anomaly_map(tmp_path, "m", "AnomalyTrack-all", "a/b", _scores())
    with pytest.raises(ValueError, match="`method`"):
        write_anomaly_map(tmp_path, "..", "AnomalyTrack-all", "f", _scores())
    with pytest.raises(ValueError, match="`compression_level`"):
        write_anomaly_map(tmp_path, *good, _scores(), compression_level=10)
    with pytest.raises(ValueError, match="`squash`.*'tanh'"):
        write_anomaly_map(tmp_path, *good, _scores(), squash="tanh")


def test_unknown_dataset_name_warns(tmp_path):
    with pytest.warns(UserWarning, match="persistence name.*'AnomalyTrack-validation'"):
        write_anomaly_map(tmp_path, "m", "AnomalyTrack-validation", "f", _scores())


def test_float16_ties_and_overflow_warn(tmp_path):
    offset = 3000 + 0.01 * np.arange(512, dtype=np.float64).reshape(16, 32)
    check = float16_check(offset)
    assert check.unique_before == 512 and check.unique_after < 10 and not check.ok
    with pytest.warns(UserWarning, match=r"float16.*keeps \d+ of 512 distinct values.*squash='rank'"):
        write_anomaly_map(tmp_path, "m", "AnomalyTrack-all", "ties", offset)
    huge = _scores()
    huge[0, :3] = [1e5, np.inf, -np.inf]
    with pytest.warns(UserWarning, match="3 value.*clipped"):
        path = write_anomaly_map(tmp_path, "m", "AnomalyTrack-all", "huge", huge)
    stored = read_anomaly_map(path)
    assert np.isfinite(stored).all() and stored[0, :3].tolist() == [FLOAT16_MAX, FLOAT16_MAX, -FLOAT16_MAX]
    assert float16_check(_scores()).ok


@pytest.mark.parametrize("method", ["rank", "sigmoid"])
def test_squash_is_strictly_increasing_inside_and_outside_the_fit_range(method):
    rng = np.random.default_rng(1)
    fit_scores = rng.normal(-20, 4, size=(32, 32))
    squash = Squash(method).fit(fit_scores)
    probe = np.sort(np.concatenate([rng.normal(-20, 10, 2000), [-1e3, -60.0, 10.0, 40.0]]))
    probe = np.unique(probe)
    squashed = squash(probe)
    assert np.all(np.diff(squashed) > 0) and np.isfinite(squashed).all()
    if method == "sigmoid":
        assert 0 < squashed.min() and squashed.max() < 1


def test_rank_squash_rescues_an_offset_map(tmp_path):
    offset = 3000 + 0.01 * np.random.default_rng(2).permutation(512).reshape(16, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = write_anomaly_map(tmp_path, "m", "AnomalyTrack-all", "rank", offset, squash="rank")
    stored = read_anomaly_map(path).astype(np.float64).ravel()
    assert np.unique(stored).size >= 256  # the raw cast keeps fewer than 10
    order = np.argsort(offset.ravel())
    assert np.all(np.diff(stored[order]) >= 0)  # ranking preserved (float16 may only merge neighbours)
    assert abs(float(np.quantile(stored, 0.99))) < 0.05  # the 99th percentile sits at float16's densest point


def test_sigmoid_with_explicit_parameters_matches_the_formula():
    squash = Squash("sigmoid", center=2.0, scale=0.5)
    scores = np.array([[0.0, 2.0, 3.0]])
    assert np.allclose(squash(scores), 1 / (1 + np.exp(-(scores - 2.0) / 0.5)))
    assert squash.params() == {"squash": "sigmoid", "center": 2.0, "scale": 0.5}
    with pytest.raises(ValueError, match="`scale`"):
        Squash("sigmoid", scale=0.0)
    with pytest.raises(ValueError, match="only with squash='sigmoid'"):
        Squash("rank", center=1.0)
    with pytest.raises(ValueError, match="call fit"):
        Squash("rank")(scores)


def test_writer_applies_one_squash_to_all_frames(tmp_path):
    writer = SmiycWriter(tmp_path, "DenseHybrid", "AnomalyTrack-all", squash="rank")
    first = _scores(3)
    path_a = writer.write("a", first)
    path_b = writer.write("b", first + 10.0)  # every score of b exceeds every score of a by at least ~4
    a, b = read_anomaly_map(path_a), read_anomaly_map(path_b)
    assert a.max() < b.min()  # a per-frame normalisation would make the two maps identical
    path_c = writer.write("c", first, dataset="ObstacleTrack-all")
    assert path_c.parent.name == "ObstacleTrack-all" and np.array_equal(read_anomaly_map(path_c), a)
    summary = writer.summary()
    assert summary["frames"] == 3 and summary["datasets"] == {"AnomalyTrack-all": 2, "ObstacleTrack-all": 1}
    assert summary["squash"]["squash"] == "rank" and summary["float16_problem_frames"] == 0


def test_writer_warns_once_and_counts_float16_problems(tmp_path):
    writer = SmiycWriter(tmp_path, "m", "LostAndFound-test")
    offset = 3000 + 0.01 * np.arange(512, dtype=np.float64).reshape(16, 32)
    with pytest.warns(UserWarning, match="Further frames are counted") as caught:
        for name in ("x", "y", "z"):
            writer.write(name, offset)
    assert len([w for w in caught if "float16" in str(w.message)]) == 1
    assert writer.summary()["float16_problem_frames"] == 3
    with pytest.raises(ValueError, match="`dataset`"):
        SmiycWriter(tmp_path, "m").write("f", offset)


def test_read_anomaly_map_errors(tmp_path):
    (tmp_path / "bad.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(DenseHybridError, match="readable HDF5"):
        read_anomaly_map(tmp_path / "bad.hdf5")
    with h5py.File(tmp_path / "other.hdf5", "w") as handle:
        handle["scores"] = np.zeros((2, 2))
    with pytest.raises(DenseHybridError, match=r"'value'.*\['scores'\]"):
        read_anomaly_map(tmp_path / "other.hdf5")
