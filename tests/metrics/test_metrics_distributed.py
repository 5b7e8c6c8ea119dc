"""Two gloo processes, each with part of the frames, sync to the single-process results exactly."""

from __future__ import annotations

import math
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densehybrid.metrics import (
    AnomalyMetrics,
    ComponentMetrics,
    ConfusionMatrix,
    PerImageAnomalyMetrics,
    SmiycAnomalyMetrics,
)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(5, 24, 32, generator=g) < 0.2).long()
    scores = torch.rand(5, 24, 32, generator=g) + 0.5 * target
    target[:, :2] = 255
    classes = torch.randint(0, 3, (5, 24, 32), generator=g)
    return scores, target, classes


def _metrics() -> dict:
    return {
        "pooled": AnomalyMetrics(bits=16),
        "per_image": PerImageAnomalyMetrics(),
        "smiyc": SmiycAnomalyMetrics(),
        "components": ComponentMetrics(0.9, min_segment_size=2, min_instance_size=2),
        "confusion": ConfusionMatrix(num_classes=2),
    }


def _evaluate(frames: slice, sync: bool) -> dict:
    scores, target, classes = _data()
    results = {}
    for name, metric in _metrics().items():
        if name == "confusion":
            metric.update(classes[frames], torch.where(target[frames] == 255, 255, classes[frames]))
        elif frames.start != frames.stop:
            metric.update(scores[frames], target[frames])
        if sync:
            metric.sync()
        results[name] = metric.compute()
    return results


def _exact_curve(frames: slice, distributed: bool) -> dict:
    """Calibration points of the exact curve, built in pieces of at most 300 pixels (several pieces, and coarse bins
    of more than 300 tied pixels resolved key by key)."""
    from densehybrid.metrics import _exact

    scores, target, _ = _data()
    scores = torch.where(torch.arange(scores.numel()).view(scores.shape) % 3 == 0, 0.25, scores)  # a big tie
    chunks = _exact.tensor_chunks(scores[frames], target[frames], 255)
    curve = _exact.ExactCurve(chunks, budget=300, distributed=distributed)
    results = {"num_pos": curve.num_pos, "num_neg": curve.num_neg}
    for strict in (False, True):
        start = curve.first_bin_at_tpr(0.95, strict)
        results[f"tpr95_{strict}"] = _exact.point_at_tpr(curve.pieces(start), curve.num_pos, 0.95, strict, True)
    results["best_f1"] = _exact.best_f1(curve.pieces(), curve.num_pos)
    results["ap"] = _exact.average_precision(curve.pieces(), curve.num_pos)
    return results


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        frames = slice(0, 2) if rank == 0 else slice(2, 5)
        results = _evaluate(frames, sync=True)
        results["exact_curve"] = _exact_curve(frames, distributed=True)
        Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_same(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(actual[key]), key
        else:  # exactly: integer states all-reduce exactly and float sums are kept as exact sums
            assert actual[key] == value, key


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_sync_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = _evaluate(slice(0, 5), sync=False)
    expected["exact_curve"] = _exact_curve(slice(0, 5), distributed=False)
    for rank in range(2):
        synced = pickle.loads(Path(tmp_path, f"rank{rank}.pkl").read_bytes())
        for name, values in expected.items():
            _assert_same(synced[name], values)
    assert expected["pooled"]["num_anomaly"] > 0 and expected["confusion"]["num_pixels"] > 0
    curve = expected["exact_curve"]
    assert curve["num_pos"] + curve["num_neg"] > 3000 and curve["tpr95_True"][1] > 0  # many pieces, a crossing


def test_float_sums_do_not_depend_on_the_batches_or_their_order():
    scores, target, _ = _data()
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        per_image, components = PerImageAnomalyMetrics(), ComponentMetrics(0.9, min_segment_size=2, min_instance_size=2)
        for i in order:
            per_image.update(scores[i : i + 1], target[i : i + 1])
            components.update(scores[i : i + 1], target[i : i + 1])
        results.append((per_image.compute(), components.compute()))
    whole = PerImageAnomalyMetrics()
    whole.update(scores, target)
    assert results[0] == results[1]
    assert whole.compute() == results[0][0]
    values = []
    for i in range(5):  # the reference: math.fsum of the per-image APs, the correctly rounded sum
        single = PerImageAnomalyMetrics()
        single.update(scores[i : i + 1], target[i : i + 1])
        values.append(single.compute()["ap"])
    assert whole.compute()["ap"] == math.fsum(values) / 5
