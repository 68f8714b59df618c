"""Real DeepSpeed lines (2 CPU ranks, gloo, tiny base): training, kills, resume, NaN guard.

Every launch pays DeepSpeed's start-up, so the kill trials run as one chain: one line is SIGKILLed
at five seeded steps in turn (one of them in the middle of a checkpoint save) and resumed each
time, and its final adapter must equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from factory import checkpoint
from factory.signing import load_or_create_key
from infra.launcher import launch

pytestmark = pytest.mark.slow
CHECKPOINT_EVERY = 2


@pytest.fixture
def line(tmp_path, tiny_base, prepared_data):
    """make(name, **changes) -> path of a written worker config for a small line."""
    key = tmp_path / "line-0.pem"
    load_or_create_key(key)

    def make(name: str, **changes) -> dict:
        body = dict(
            base_model_path=str(tiny_base.path),
            base_model_sha256=tiny_base.sha256,
            init_adapter=None,
            data_path=str(prepared_data),
            shard_index=1,
            num_shards=64,  # 4 rows: every step's mean loss is over the same rows, so it must fall
            seed=11,
            steps=12,
            micro_batch_size=2,
            learning_rate=1e-2,
            warmup_steps=2,
            lora_rank=4,
            lora_alpha=8,
            target_modules=["gate_proj", "up_proj", "down_proj"],
            zero_stage=2,
            precision="fp32",
            checkpoint_dir=str(tmp_path / name / "checkpoints"),
            checkpoint_every=CHECKPOINT_EVERY,
            output_dir=str(tmp_path / name / "candidate"),
            contributor_id="line-0",
            key_path=str(key),
            expert_id="e1",
            cycle=0,
            parent_adapter_sha256=None,
        )
        body.update(changes)
        return body

    return make


def run(config: dict, kill_at: int | None = None, launcher: str = "torchrun"):
    path = config["checkpoint_dir"] + ".json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(config, fh)
    jobs = []

    def on_metric(metric):
        # ">=": under load the reader may see step k only after the rank has moved on.
        if kill_at is not None and metric["step"] >= kill_at:
            jobs[0].signal_all(signal.SIGKILL)

    return launch(["--config", path], 2, launcher=launcher, timeout_s=400,
                  on_metric=on_metric, on_start=jobs.append)  # fmt: skip


def adapter(config: dict) -> dict[str, torch.Tensor]:
    return load_file(config["output_dir"] + "/adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def resumed_step(result) -> int:
    return next(e["step"] for e in result.events if e["event"] == "resume")


def losses_fall(result) -> bool:
    losses = [m["loss"] for m in result.metrics]
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.015


def test_zero2_sigkill_chain_resumes_to_the_uninterrupted_adapter(line):
    reference = line("reference")
    ref = run(reference)
    assert ref.outcome == "ok", ref
    assert [m["step"] for m in ref.metrics] == list(range(1, 13))
    assert losses_fall(ref), [m["loss"] for m in ref.metrics]
    assert ref.report["tokens_seen"] == 12 * 2 * 2 * 64

    killed = line("killed")
    rng = random.Random(20240611)
    kills = sorted(rng.sample(range(1, 12), 4))
    save_kill = rng.choice([s for s in range(2, 12, CHECKPOINT_EVERY) if s not in kills])
    plan = sorted([(k, "step") for k in kills] + [(save_kill, "save")])
    for trial, (step, how) in enumerate(plan):
        if how == "save":
            result = run({**killed, "kill_during_save_at_step": step})
        else:
            result = run(killed, kill_at=step)
        assert result.outcome == "retryable", (trial, result)
        last_seen = result.metrics[-1]["step"] if result.metrics else 0
        newest = checkpoint.latest_valid(killed["checkpoint_dir"])
        newest_step = newest[0] if newest else 0
        if how == "save":  # the torn save at `step` is never taken
            assert newest_step == step - CHECKPOINT_EVERY
        assert last_seen - newest_step <= CHECKPOINT_EVERY, (trial, last_seen, newest_step)
    final = run(killed)
    assert final.outcome == "ok", final
    assert resumed_step(final) >= plan[-1][0] - CHECKPOINT_EVERY
    assert max_difference(adapter(reference), adapter(killed)) <= 1e-5
    assert final.report["tokens_seen"] == ref.report["tokens_seen"]


def test_zero3_trains_and_resumes_under_the_deepspeed_launcher(line):
    reference = line("z3-reference", zero_stage=3, steps=8)
    ref = run(reference, launcher="deepspeed")
    assert ref.outcome == "ok", ref
    assert losses_fall(ref), [m["loss"] for m in ref.metrics]
    killed = line("z3-killed", zero_stage=3, steps=8)
    first = run(killed, kill_at=5)
    assert first.outcome == "retryable", first
    second = run(killed)
    assert second.outcome == "ok" and resumed_step(second) >= 5 - CHECKPOINT_EVERY
    assert max_difference(adapter(reference), adapter(killed)) <= 1e-5


def test_zero0_clips_locally_as_deepspeed_clips_under_zero2(line):
    """ZeRO-0 clips the (already all-reduced) gradients itself; ZeRO-2 leaves it to DeepSpeed.
    With a norm small enough to clip every step, both measure the same gradient norms and end
    with the same adapter."""
    trained, norms = {}, {}
    for stage in (2, 0):
        config = line(f"clip-z{stage}", zero_stage=stage, steps=4, max_grad_norm=0.01)
        result = run(config)
        assert result.outcome == "ok", result
        trained[stage] = adapter(config)
        norms[stage] = [m["grad_norm"] for m in result.metrics]
    assert len(norms[0]) == 4 and all(n > 0.01 for n in norms[0]), norms  # clipping engaged
    assert norms[0] == pytest.approx(norms[2], rel=1e-4)
    assert max_difference(trained[2], trained[0]) <= 1e-5


def test_non_finite_losses_skip_then_abort_without_checkpoints(line):
    config = line("nan", zero_stage=0, steps=10, checkpoint_every=1,
                  inject_nonfinite_steps=[1, 4, 5, 6])  # fmt: skip
    result = run(config)
    assert (result.outcome, result.reason) == ("final", "non_finite_loss")
    skipped = [e["step"] for e in result.events if e["event"] == "non_finite_loss"]
    assert skipped == [1, 4, 5, 6]
    # Step index 1 is skipped without an optimizer step; indices 0, 2, 3 train.
    assert [m["step"] for m in result.metrics] == [1, 3, 4]
    saved = [s for s, _ in checkpoint.list_checkpoints(config["checkpoint_dir"])]
    assert saved == [1]  # nothing is written after the first non-finite loss
    assert not os.path.exists(config["output_dir"])
