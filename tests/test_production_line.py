"""Production lines: planning, keys registered in the ledger, bounded concurrency."""

from __future__ import annotations

import pytest

from factory.ledger import Ledger
from factory.production_line import ensure_line_keys, key_path, plan_lines
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
