"""Production lines: planning, keys registered in the ledger, bounded concurrency."""

from __future__ import annotations

import threading
import time

import pytest

from factory.ledger import Ledger
from factory.production_line import ensure_line_keys, key_path, plan_lines, run_lines
from factory.signing import load_private_key, public_key_b64


def test_plan_lines_assigns_seeds_shards_and_overrides():
    lines = plan_lines(5, base_seed=100, num_shards=3, overrides=[{}, {"learning_rate": 1e-3}])
    assert [x.contributor_id for x in lines] == [f"line-{k}" for k in range(5)]
    assert [x.seed for x in lines] == [100, 101, 102, 103, 104]
    assert [x.shard_index for x in lines] == [0, 1, 2, 0, 1]
    assert lines[1].overrides == {"learning_rate": 1e-3} and lines[4].overrides == {}
    with pytest.raises(ValueError, match="overrides"):
        plan_lines(2, 0, 1, overrides=[{"key_path": "x"}])
    with pytest.raises(ValueError, match="num_lines"):
        plan_lines(0, 0, 1)


def test_line_keys_are_created_once_and_registered(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'taas.db'}")
    lines = plan_lines(2, 0, 2)
    first = ensure_line_keys(tmp_path, ledger, lines)
    assert first["line-1"] == key_path(tmp_path, "line-1") == tmp_path / "keys" / "line-1.pem"
    public = public_key_b64(load_private_key(first["line-1"]))
    assert ledger.public_key("line-1") == public
    again = ensure_line_keys(tmp_path, ledger, lines)  # idempotent: same key, no error
    assert public_key_b64(load_private_key(again["line-1"])) == public


def test_run_lines_respects_the_concurrency_limit():
    active, peak, lock = [0], [0], threading.Lock()

    def run_line(line):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        if line.index == 3:
            raise OSError("disk full")
        return {"outcome": "ok", "line": line.index}

    results = run_lines(plan_lines(5, 0, 1), run_line, max_concurrent=2)
    assert peak[0] == 2
    assert [r["line"] for r in results] == [0, 1, 2, 3, 4]
    assert results[3]["outcome"] == "retryable" and "disk full" in results[3]["reason"]
