"""The Prefect training task: a real 2-rank line, metrics into a real MLflow store, outcomes."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from factory.candidate import CandidateFiles, read_manifest
from factory.signing import load_or_create_key, public_key_b64, verify
from factory.train_config import TrainConfig

pytestmark = pytest.mark.slow


def _config(tmp_path, tiny_base, prepared_data, **changes) -> dict:
    key = tmp_path / "line-2.pem"
    load_or_create_key(key)
    body = dict(
        base_model_path=str(tiny_base.path),
        base_model_sha256=tiny_base.sha256,
        init_adapter=None,
        data_path=str(prepared_data),
        shard_index=2,
        num_shards=4,
        seed=5,
        steps=4,
        micro_batch_size=2,
        learning_rate=1e-2,
        warmup_steps=1,
        lora_rank=4,
        lora_alpha=8,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        zero_stage=1,
        precision="fp32",
        checkpoint_dir=str(tmp_path / "checkpoints"),
        checkpoint_every=2,
        output_dir=str(tmp_path / "candidate"),
        contributor_id="line-2",
        key_path=str(key),
        expert_id="e1",
        cycle=1,
        parent_adapter_sha256=None,
    )
    body.update(changes)
    return body


def test_train_line_task_writes_a_signed_candidate_and_logs_metrics(
    tmp_path, tiny_base, prepared_data
):
    from tasks.training import train_line

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("lines", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(experiment).info.run_id
    config = _config(tmp_path, tiny_base, prepared_data)
    out = train_line(
        TrainConfig.model_validate(config), 2, timeout_s=400, tracking_uri=tracking_uri,
        run_id=run_id,
    )  # fmt: skip
    assert out.outcome == "ok", out
    assert out.tokens_seen == 4 * 2 * 2 * 64
    files = CandidateFiles(tmp_path / "candidate")
    manifest = read_manifest(files)
    assert (manifest.data_shard, manifest.steps, manifest.cycle) == ("2/4", 4, 1)
    assert manifest.base_model_sha256 == tiny_base.sha256
    assert manifest.parent_adapter_sha256 is None
    public = public_key_b64(load_or_create_key(tmp_path / "line-2.pem"))
    assert verify(public, manifest.model_dump(mode="json"), files.signature.read_text())
    # The line's curves go to its own run, nested under the given one and named by cycle/line.
    lines = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert [(r.info.run_name, r.info.status) for r in lines] == [("cycle-1/line-2", "FINISHED")]
    assert client.get_metric_history(run_id, "loss") == []
    history = client.get_metric_history(lines[0].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert history[-1].value == pytest.approx(out.final_loss, abs=1e-6)


def test_bad_config_in_the_worker_is_final_and_not_retried(tmp_path, tiny_base, prepared_data):
    from tasks.training import run_training

    config = _config(tmp_path, tiny_base, prepared_data, base_model_sha256="f" * 64)
    out = run_training(TrainConfig.model_validate(config), 2, timeout_s=400)
    assert (out.outcome, out.reason) == ("final", "bad_config")
    assert out.candidate_path is None
    with pytest.raises(ValueError, match="zero_stage"):
        run_training(TrainConfig.model_validate({**config, "zero_stage": 5}), 2)
