"""A line across nodes: two torchrun launcher groups joined by a c10d rendezvous on loopback.

Each "node" is one ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d`` process group
started by :func:`infra.launcher.launch`, as each machine of a multi-node line starts its own; the
ranks meet over gloo. Same worker (``factory.train``), same config: the adapter must equal the one
a single-node 2-process run writes. The checkpoint and candidate folders are shared, as the
launcher's multi-node notes require (one machine here: one file system).
"""

from __future__ import annotations

import json
import threading

import pytest
from safetensors.torch import load_file

from factory.candidate import CandidateFiles
from factory.signing import load_or_create_key
from infra.launcher import Rendezvous, build_command, free_port, launch, line_rendezvous

TIMEOUT_S = 600  # launch() kills the job's process groups past this


def _config(root, tiny_base, prepared_data) -> dict:
    key = root / "line-0.pem"
    load_or_create_key(key)
    return dict(
        base_model_path=str(tiny_base.path),
        base_model_sha256=tiny_base.sha256,
        init_adapter=None,
        data_path=str(prepared_data),
        shard_index=0,
        num_shards=2,
        seed=11,
        steps=3,
        micro_batch_size=2,
        learning_rate=1e-2,
        warmup_steps=1,
        lora_rank=4,
        lora_alpha=8,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        zero_stage=1,
        precision="fp32",
        checkpoint_dir=str(root / "checkpoints"),
        checkpoint_every=100,
        output_dir=str(root / "candidate"),
        contributor_id="line-0",
        key_path=str(key),
        expert_id="e1",
        cycle=1,
        parent_adapter_sha256=None,
    )


def _write(root, body) -> str:
    (root / "checkpoints").mkdir(parents=True)
    path = root / "train_config.json"
    path.write_text(json.dumps(body))
    return str(path)


def test_rendezvous_command_and_refusals():
    rdzv = Rendezvous(endpoint="10.0.0.5:29400", nnodes=2, run_id="line-abc")
    command = build_command("factory.train", ["--config", "c.json"], 4, "torchrun", rendezvous=rdzv)
    text = " ".join(command)
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 10.0.0.5:29400" in text
    assert "--rdzv-id line-abc --nproc-per-node 4" in text and "--master-addr" not in text
    assert command[-3:] == ["factory.train", "--config", "c.json"]
    assert line_rendezvous(None, 1, "ab" * 32) is None
    assert line_rendezvous("h:1", 3, "ab" * 32).run_id == "line-" + "ab" * 8
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        Rendezvous(endpoint="h; rm -rf /:1", nnodes=2, run_id="x")
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        build_command("factory.train", [], 1, "deepspeed", rendezvous=rdzv)


def test_settings_rendezvous_needs_torchrun_and_an_endpoint(tmp_path):
    from pydantic import ValidationError

    from infra.settings import get_settings

    settings = get_settings(home=tmp_path, rdzv_endpoint="node-a:29400", nnodes=2)
    assert (settings.rdzv_endpoint, settings.nnodes) == ("node-a:29400", 2)
    with pytest.raises(ValidationError, match="nnodes"):
        get_settings(home=tmp_path, nnodes=2)
    with pytest.raises(ValidationError, match="rdzv_endpoint"):
        get_settings(home=tmp_path, rdzv_endpoint="node-a:29400", launcher="deepspeed")
    with pytest.raises(ValidationError, match="rdzv_endpoint"):
        get_settings(home=tmp_path, rdzv_endpoint="node-a")


@pytest.mark.slow
def test_line_across_two_nodes_matches_one_node(tmp_path, tiny_base, prepared_data):
    single_root, multi_root = tmp_path / "single", tmp_path / "multi"
    single = _write(single_root, _config(single_root, tiny_base, prepared_data))
    body = _config(multi_root, tiny_base, prepared_data)
    body["key_path"] = str(single_root / "line-0.pem")  # same signer; the adapter is compared
    multi = _write(multi_root, body)

    one = launch(["--config", single], 2, timeout_s=TIMEOUT_S,
                 log_path=single_root / "train.log")  # fmt: skip
    assert one.outcome == "ok", (one, (single_root / "train.log").read_text()[-3000:])

    rdzv = Rendezvous(endpoint=f"127.0.0.1:{free_port()}", nnodes=2, run_id="line-multinode")
    results: dict[int, object] = {}

    def node(rank: int) -> None:
        log = multi_root / f"node-{rank}.log"
        results[rank] = launch(["--config", multi], 1, rendezvous=rdzv, timeout_s=TIMEOUT_S,
                               log_path=log)  # fmt: skip

    threads = [threading.Thread(target=node, args=(n,), daemon=True) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:  # launch() is bounded by TIMEOUT_S and kills its groups itself
        thread.join(TIMEOUT_S + 60)
    assert not any(t.is_alive() for t in threads), "a node's launcher outlived its timeout"
    logs = {n: (multi_root / f"node-{n}.log").read_text()[-2000:] for n in (0, 1)}
    first = (multi_root / "node-1.log").read_text().splitlines()[0]
    # What another node runs to join: the same command, rendezvous and config.
    assert first.startswith("TAAS_COMMAND ") and f"--rdzv-endpoint {rdzv.endpoint}" in first
    assert "--rdzv-id line-multinode" in first and first.endswith(f"--config {multi}")
    assert all(results[n].returncode == 0 for n in (0, 1)), (results, logs)
    # Rank 0 (on whichever node the rendezvous numbered first) reports the candidate.
    reports = [r.report for r in results.values() if r.report]
    assert reports and all(r["outcome"] == "ok" for r in reports), (results, logs)
    # One world of 2 ranks across the groups (two worlds of 1 would have seen half the tokens).
    assert one.report["tokens_seen"] == reports[0]["tokens_seen"] == 3 * 2 * 2 * 64

    a = load_file(CandidateFiles(single_root / "candidate").adapter)
    b = load_file(CandidateFiles(multi_root / "candidate").adapter)
    assert sorted(a) == sorted(b) and len(a) > 0
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"adapters differ by {worst}"
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert moved > 0  # training moved lora_B off its zero init: the comparison means something
