"""Checkpoint folders: torn ones (marker missing, truncated file, flipped byte) are never taken."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from factory import checkpoint
from infra.atomic import MARKER, committed_dir


def _fake_checkpoint(root, step: int) -> None:
    with committed_dir(root / checkpoint.checkpoint_name(step)) as tmp:
        (tmp / checkpoint.ENGINE_DIR).mkdir()
        (tmp / checkpoint.ENGINE_DIR / "optim.pt").write_bytes(bytes(range(256)) * 4)
        (tmp / checkpoint.STATE_FILE).write_text(json.dumps({"next_step": step}))


def _tear(folder, how: str) -> None:
    target = folder / checkpoint.ENGINE_DIR / "optim.pt"
    if how == "marker_missing":
        (folder / MARKER).unlink()
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    elif how == "byte_flipped":
        data = bytearray(target.read_bytes())
        data[517] ^= 0x01
        target.write_bytes(bytes(data))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["marker_missing", "truncated", "byte_flipped"])
def test_torn_newest_checkpoint_is_skipped(tmp_path, how):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    _tear(tmp_path / checkpoint.checkpoint_name(6), how)
    step, folder = checkpoint.latest_valid(tmp_path)
    assert step == 4 and folder.name == "step-00000004"


def test_no_valid_checkpoint_means_fresh_start(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    _tear(tmp_path / checkpoint.checkpoint_name(3), "byte_flipped")
    (tmp_path / ".step-00000005.abc.tmp").mkdir()  # an unfinished save's temp folder
    assert checkpoint.latest_valid(tmp_path) is None
    assert checkpoint.latest_valid(tmp_path / "absent") is None


def test_prune_keeps_last_k_valid_and_newer_torn_ones(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(tmp_path, step)
    _tear(tmp_path / checkpoint.checkpoint_name(2), "truncated")
    _tear(tmp_path / checkpoint.checkpoint_name(5), "marker_missing")
    removed = checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step-00000001", "step-00000002"]
    left = [s for s, _ in checkpoint.list_checkpoints(tmp_path)]
    assert left == [3, 4, 5]
    assert checkpoint.latest_valid(tmp_path)[0] == 4


def test_rng_state_round_trip(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    checkpoint.write_rank_state(tmp_path, rank=1)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    checkpoint.read_rank_state(tmp_path, rank=1)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])
