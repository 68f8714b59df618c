"""Unit tests of the retrain flow's pure decisions: when an expert is due, the derived spec."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from factory.commission import parse_spec
from tasks.retraining import DUE_REASONS, derived_spec, is_due
from tests.conftest import TINY_COMMISSION

NOW = datetime(2025, 6, 30, 3, 0, tzinfo=UTC)
SHA = "a" * 64


def test_not_due_when_young_and_data_unchanged():
    created = NOW - timedelta(days=29, hours=23)
    assert is_due(NOW, created, timedelta(days=30), SHA, SHA) is None


def test_due_by_age_only_past_max_age():
    assert is_due(NOW, NOW - timedelta(days=30, seconds=1), timedelta(days=30), SHA, SHA) == "age"
    # exactly max_age old is not yet older than it
    assert is_due(NOW, NOW - timedelta(days=30), timedelta(days=30), SHA, SHA) is None


def test_max_age_zero_makes_every_past_champion_due():
    assert is_due(NOW, NOW - timedelta(seconds=1), timedelta(0), SHA, SHA) == "age"


def test_due_when_data_changed_even_if_young():
    assert is_due(NOW, NOW, timedelta(days=30), "b" * 64, SHA) == "data_changed"


def test_data_change_wins_over_age():
    old = NOW - timedelta(days=400)
    assert is_due(NOW, old, timedelta(days=30), "b" * 64, SHA) == "data_changed"
    assert set(DUE_REASONS) == {"data_changed", "age"}


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "licences.jsonl").write_text('{"text": "x"}\n')
    return parse_spec(TINY_COMMISSION, base_dir=tmp_path)


def test_derived_spec_shifts_seed_by_versions_and_overrides_cycles(spec):
    data = derived_spec(spec, cycles=2, num_versions=3)
    derived = parse_spec(data)
    assert derived.seed == TINY_COMMISSION["seed"] + 3 == 6
    assert derived.budget.cycles == 2
    # everything else is the customer's spec, unchanged
    same = derived.model_copy(update={"seed": spec.seed, "budget": spec.budget})
    assert same == spec
    assert derived.budget.steps_per_cycle == spec.budget.steps_per_cycle == 12


def test_derived_spec_is_a_new_commission_on_unchanged_data(spec):
    from factory.commission import spec_sha256
    from factory.commission_store import commission_id_for

    data_sha = "d" * 64
    first = parse_spec(derived_spec(spec, cycles=1, num_versions=1))
    second = parse_spec(derived_spec(spec, cycles=1, num_versions=2))
    ids = {commission_id_for(spec_sha256(s), data_sha) for s in (spec, first, second)}
    assert len(ids) == 3
    # and it is reproducible: the same inputs give the same commission
    again = parse_spec(derived_spec(spec, cycles=1, num_versions=2))
    assert spec_sha256(again) == spec_sha256(second)


def test_derived_spec_keeps_absolute_data_uris(spec, tmp_path):
    data = derived_spec(spec, cycles=1, num_versions=1)
    assert data["data"][0]["uri"] == str(tmp_path.absolute() / "licences.jsonl")
    # a derived spec written elsewhere still names the same file
    assert parse_spec(data, base_dir=tmp_path / "elsewhere").data[0].uri == data["data"][0]["uri"]


def test_derived_spec_rejects_zero_cycles(spec):
    with pytest.raises(ValueError, match="cycles"):
        derived_spec(spec, cycles=0, num_versions=1)
