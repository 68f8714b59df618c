"""The worker's pure parts: config validation, data order, learning-rate schedule."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from factory.signing import load_or_create_key
from factory.train import (
    EXIT_RETRYABLE,
    EXIT_WORKER_ERROR,
    batch_positions,
    check_inputs,
    exit_code_for,
    lr_factor,
    sample_at,
    shard_rows,
)
from factory.train_config import TrainConfig


def config_dict(tmp_path, **changes) -> dict:
    body = dict(
        base_model_path=str(tmp_path / "base"),
        base_model_sha256="0" * 64,
        init_adapter=None,
        data_path=str(tmp_path / "data"),
        shard_index=0,
        num_shards=2,
        seed=7,
        steps=10,
        micro_batch_size=2,
        learning_rate=1e-3,
        warmup_steps=2,
        lora_rank=4,
        lora_alpha=8,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        zero_stage=2,
        precision="fp32",
        checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_every=2,
        output_dir=str(tmp_path / "out"),
        contributor_id="line-0",
        key_path=str(tmp_path / "k.pem"),
        expert_id="e1",
        cycle=0,
        parent_adapter_sha256=None,
    )
    body.update(changes)
    return body


def test_config_rejects_unknown_and_bad_fields(tmp_path):
    TrainConfig.model_validate(config_dict(tmp_path))
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig.model_validate(config_dict(tmp_path, lr=1.0))
    with pytest.raises(ValidationError, match="shard_index"):
        TrainConfig.model_validate(config_dict(tmp_path, shard_index=2))
    with pytest.raises(ValidationError, match="zero_stage"):
        TrainConfig.model_validate(config_dict(tmp_path, zero_stage=4))
    with pytest.raises(ValidationError, match="init_adapter"):
        TrainConfig.model_validate(config_dict(tmp_path, parent_adapter_sha256="ab"))
    missing = config_dict(tmp_path)
    del missing["seed"]
    with pytest.raises(ValidationError, match="seed"):
        TrainConfig.model_validate(missing)


def test_config_hash_ignores_test_knobs_only(tmp_path):
    base = TrainConfig.model_validate(config_dict(tmp_path)).sha256()
    knob = TrainConfig.model_validate(config_dict(tmp_path, inject_nonfinite_steps=[3])).sha256()
    other = TrainConfig.model_validate(config_dict(tmp_path, seed=8)).sha256()
    assert base == knob and base != other and len(base) == 64


def test_inputs_a_run_could_never_use_are_refused_by_field(tmp_path, prepared_data):
    load_or_create_key(tmp_path / "k.pem")
    good = config_dict(tmp_path, data_path=str(prepared_data))
    check_inputs(TrainConfig.model_validate(good))
    (tmp_path / "bad.pem").write_text("not a key")
    (tmp_path / "adapter").mkdir()
    for changes, field in [
        ({"data_path": str(tmp_path / "missing")}, "data_path"),
        (
            {"init_adapter": str(tmp_path / "adapter"), "parent_adapter_sha256": "0" * 64},
            "init_adapter",
        ),
        ({"key_path": str(tmp_path / "bad.pem")}, "key_path"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            check_inputs(TrainConfig.model_validate({**good, **changes}))


def test_exceptions_the_same_inputs_would_raise_again_are_final():
    assert exit_code_for(ValueError("shape")) == EXIT_WORKER_ERROR
    assert exit_code_for(KeyError("lora_A")) == EXIT_WORKER_ERROR
    # a lost peer surfaces in the survivors as a RuntimeError from the collective
    assert exit_code_for(RuntimeError("Connection closed by peer")) == EXIT_RETRYABLE
    assert exit_code_for(OSError("No space left on device")) == EXIT_RETRYABLE


def test_data_order_is_a_permutation_per_epoch_and_deterministic():
    shard = 10
    epoch0 = [sample_at(p, shard, seed=1, shard_index=0) for p in range(shard)]
    epoch1 = [sample_at(p, shard, seed=1, shard_index=0) for p in range(shard, 2 * shard)]
    assert sorted(epoch0) == list(range(shard)) and sorted(epoch1) == list(range(shard))
    assert epoch0 != epoch1
    assert epoch0 == [sample_at(p, shard, seed=1, shard_index=0) for p in range(shard)]
    assert epoch0 != [sample_at(p, shard, seed=2, shard_index=0) for p in range(shard)]


def test_batch_positions_tile_the_stream_without_overlap():
    seen = []
    for step in range(3):
        for micro in range(2):
            for rank in range(2):
                seen.extend(batch_positions(step, micro, rank, world=2, mbs=3, accum=2))
    assert seen == list(range(3 * 2 * 2 * 3))


def test_shards_partition_the_rows():
    parts = [shard_rows(11, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert parts[1] == [1, 4, 7, 10]


def test_lr_schedule_warmup_then_cosine_to_tenth():
    assert lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(20, 4, 20) == pytest.approx(0.1)
