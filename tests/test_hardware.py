"""Precision, device, backend and DeepSpeed-overlay selection (infra.hardware), as unit tests.

The hardware is passed in (``cuda=...``, ``bf16_supported=...``) so both the CPU and the GPU
branches run here; the GPU-marked test checks the real device where there is one.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from infra.hardware import (
    accelerator_env,
    deep_merge,
    dist_backend,
    line_hardware_fields,
    read_ds_overlay,
    select_precision,
    torch_device,
)
from infra.settings import get_settings


def test_precision_from_hardware_and_settings():
    assert select_precision("auto", cuda=False) == "fp32"
    assert select_precision("auto", cuda=True, bf16_supported=True) == "bf16"
    assert select_precision("auto", cuda=True, bf16_supported=False) == "fp32"
    assert select_precision("fp32", cuda=True) == "fp32"
    assert select_precision("bf16", cuda=True) == "bf16"
    with pytest.raises(ValueError, match="^precision: bf16 needs a CUDA device"):
        select_precision("bf16", cuda=False)
    with pytest.raises(ValueError, match="^precision: 'fp16'; use auto, fp32 or bf16$"):
        select_precision("fp16", cuda=False)


def test_device_backend_and_accelerator_env():
    assert (torch_device(cuda=False), dist_backend(cuda=False)) == ("cpu", "gloo")
    assert (torch_device(cuda=True), dist_backend(cuda=True)) == ("cuda", "nccl")
    assert accelerator_env({}, cuda=False) == {"DS_ACCELERATOR": "cpu"}
    assert accelerator_env({}, cuda=True) == {}  # never forced where CUDA exists
    assert accelerator_env({"DS_ACCELERATOR": "cuda"}, cuda=False) == {}  # the user's choice


def test_deep_merge_and_overlay_validation(tmp_path):
    base = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5}, "steps_per_print": 9}
    merged = deep_merge(base, {"zero_optimization": {"reduce_bucket_size": 7}, "extra": [1]})
    assert merged == {
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 7},
        "steps_per_print": 9,
        "extra": [1],
    }
    assert base["zero_optimization"]["reduce_bucket_size"] == 5  # inputs untouched
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="sets zero_optimization.stage, which the factory"):
        read_ds_overlay(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        read_ds_overlay(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        read_ds_overlay(bad)
    with pytest.raises(ValueError, match="no such file"):
        read_ds_overlay(tmp_path / "absent.json")


def test_line_fields_put_the_overlay_hash_in_the_config(tmp_path):
    overlay = tmp_path / "ds.json"
    overlay.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    settings = get_settings(home=tmp_path, precision="fp32", ds_config_overlay=overlay)
    fields = line_hardware_fields(settings)
    assert fields == {
        "precision": "fp32",
        "ds_config_overlay": str(overlay),
        "ds_config_overlay_sha256": hashlib.sha256(overlay.read_bytes()).hexdigest(),
    }
    plain = line_hardware_fields(get_settings(home=tmp_path, precision="fp32"))
    assert plain == {
        "precision": "fp32",
        "ds_config_overlay": None,
        "ds_config_overlay_sha256": None,
    }
    overlay.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 2000}}))
    with pytest.raises(ValueError, match="changed since the line was planned"):
        read_ds_overlay(overlay, fields["ds_config_overlay_sha256"])


def test_worker_ds_config_merges_the_overlay(tmp_path):
    from factory.train import ds_config
    from factory.train_config import TrainConfig

    overlay = tmp_path / "ds.json"
    overlay.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    body = dict(
        base_model_path=tmp_path, base_model_sha256="0" * 64, init_adapter=None,
        data_path=tmp_path, shard_index=0, num_shards=1, seed=0, steps=4, micro_batch_size=2,
        learning_rate=1e-3, warmup_steps=1, lora_rank=4, lora_alpha=8.0,
        target_modules=["up_proj"], zero_stage=2, precision="fp32",
        checkpoint_dir=tmp_path / "ck", checkpoint_every=2, output_dir=tmp_path / "out",
        contributor_id="c", key_path=tmp_path / "k", expert_id="e", cycle=0,
        parent_adapter_sha256=None,
    )  # fmt: skip
    plain = TrainConfig(**body)
    fields = line_hardware_fields(get_settings(home=tmp_path, precision="fp32",
                                               ds_config_overlay=overlay))  # fmt: skip
    config = TrainConfig(**{**body, **fields})
    merged, own = ds_config(config, world=2), ds_config(plain, world=2)
    assert own["zero_optimization"] == {
        "stage": 2, "stage3_gather_16bit_weights_on_model_save": True
    }  # fmt: skip
    assert merged["zero_optimization"]["reduce_bucket_size"] == 1000
    assert merged["zero_optimization"]["stage"] == 2 and merged["train_batch_size"] == 4
    assert config.sha256() != plain.sha256()


@pytest.mark.gpu
def test_cuda_host_selects_bf16_nccl_and_no_cpu_accelerator():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert dist_backend() == "nccl" and torch_device() == "cuda"
    assert accelerator_env({}) == {}
    assert select_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
