"""Overhead of the factory's training worker over a plain peft + torch DDP loop.

Both run on the same base (``--base``: a preset name, default ``tiny``, or a base model folder
such as the imported SmolLM2 under ``.taas/base``), LoRA config, micro-batch, sequence length
and process count (torchrun, gloo on CPU), alternating ``--rounds`` times; the per-step time is
the median over steps after ``--skip`` warm-up steps of (wall time of forward + backward +
optimizer step) on rank 0. Prints both medians, their ratio factory / plain, each round's
ratio and the median of those (goal: <= 1.05)::

    python -m bench.train_overhead --home .cache/test --steps 30 --rounds 3
    python -m bench.train_overhead --base .taas/base/gguf-<sha> --seq-len 128 --steps 8 --skip 2

Training tokens/s (both ranks) are printed beside the step times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

WORLD = 2
MICRO_BATCH = 4


def plain_worker(config_path: Path) -> None:
    """The reference: peft + DDP + AdamW + the same learning-rate schedule and gradient clipping,
    in the same data order as the factory worker."""
    import datasets
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model

    from factory.base_model import load_base
    from factory.train import batch_positions, lr_factor, sample_at, shard_rows

    config = json.loads(Path(config_path).read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = datasets.load_from_disk(str(Path(config["data_path"]) / "train")).with_format("torch")
    ids = ids["input_ids"]
    shard = ids[shard_rows(len(ids), config["shard_index"], config["num_shards"])]
    torch.manual_seed(config["seed"])
    base, _ = load_base(config["base_model_path"])
    lora = LoraConfig(
        r=config["lora_rank"],
        lora_alpha=config["lora_alpha"],
        target_modules=config["target_modules"],
        lora_dropout=0.0,
        bias="none",
    )
    model = torch.nn.parallel.DistributedDataParallel(get_peft_model(base, lora))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=0.0)
    # the factory's schedule (warm-up, then cosine): both loops do the same work per step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config["warmup_steps"], config["steps"])
    )
    mbs = config["micro_batch_size"]
    for step in range(config["steps"]):
        started = time.perf_counter()
        positions = batch_positions(step, 0, rank, world, mbs, 1)
        batch = shard[[sample_at(p, len(shard), config["seed"], config["shard_index"])
                       for p in positions]]  # fmt: skip
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        if rank == 0:
            print("TAAS_METRIC " + json.dumps({"step": step + 1, "step_s": elapsed}), flush=True)
    # Leave together: a gloo group destroyed by one rank after the other has exited can hang.
    dist.barrier()


def _step_times(metrics: list[dict], skip: int, seq_len: int) -> list[float]:
    times = []
    for m in metrics[skip:]:
        if "step_s" in m:
            times.append(m["step_s"])
        else:  # factory worker: tokens_per_s over this step's world * micro-batch * seq_len
            times.append(WORLD * MICRO_BATCH * seq_len / m["tokens_per_s"])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(".cache/test"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--base", default="tiny", help="a preset name or a base model folder")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--plain-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        plain_worker(args.plain_worker)
        return

    from datasets import Dataset

    from factory.base_model import PRESETS, ensure_base_model, folder_ref, load_base
    from factory.corpus import general_text
    from factory.signing import load_or_create_key
    from infra.launcher import launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.base in PRESETS:
        ref = ensure_base_model(args.home, args.base, log=lambda *_: None)
    else:
        ref = folder_ref(Path(args.base))
    width = args.seq_len
    work = Path(tempfile.mkdtemp(prefix="taas-bench-"))
    _, tokenizer = load_base(ref.path)
    flat: list[int] = []
    for text in general_text(max_chars=60_000 * max(1, width // 64)):
        flat.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    blocks = [flat[i : i + width] for i in range(0, len(flat) - width + 1, width)][:256]
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(work / "data" / "train"))
    load_or_create_key(work / "k.pem")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    medians: dict[str, list[float]] = {"factory": [], "plain": []}
    for round_index in range(args.rounds):
        config = dict(
            base_model_path=str(ref.path), base_model_sha256=ref.sha256, init_adapter=None,
            data_path=str(work / "data"), shard_index=0, num_shards=1, seed=round_index,
            steps=args.steps, micro_batch_size=MICRO_BATCH, learning_rate=1e-3, warmup_steps=0,
            lora_rank=8, lora_alpha=16, target_modules=["down_proj", "gate_proj", "up_proj"],
            zero_stage=args.zero_stage, precision="fp32",
            checkpoint_dir=str(work / f"ck-{round_index}"), checkpoint_every=10**6,
            output_dir=str(work / f"out-{round_index}"), contributor_id="bench",
            key_path=str(work / "k.pem"), expert_id="bench", cycle=0,
            parent_adapter_sha256=None,
        )  # fmt: skip
        path = work / f"config-{round_index}.json"
        path.write_text(json.dumps(config))
        runs = {
            "factory": ("factory.train", ["--config", str(path)]),
            "plain": ("bench.train_overhead", ["--plain-worker", str(path)]),
        }
        for name, (module, worker_args) in runs.items():
            result = launch(worker_args, WORLD, env=env, worker_module=module, timeout_s=600)
            if result.outcome != "ok" and name == "factory":
                sys.exit(f"{name} run failed: {result.reason}")
            step_s = statistics.median(_step_times(result.metrics, args.skip, width))
            medians[name].append(step_s)
            print(f"round {round_index} {name}: median step {step_s * 1e3:.1f} ms, "
                  f"{WORLD * MICRO_BATCH * width / step_s:.0f} tokens/s", flush=True)  # fmt: skip
    factory_ms = statistics.median(medians["factory"]) * 1e3
    plain_ms = statistics.median(medians["plain"]) * 1e3
    # The machine's speed drifts between rounds; a round's two runs are neighbours in time, so
    # the median of per-round ratios is the figure least moved by that drift.
    ratios = [f / p for f, p in zip(medians["factory"], medians["plain"], strict=True)]
    print(json.dumps({"factory_step_ms": round(factory_ms, 2), "plain_step_ms": round(plain_ms, 2),
                      "ratio": round(factory_ms / plain_ms, 3),
                      "round_ratios": [round(r, 3) for r in ratios],
                      "median_round_ratio": round(statistics.median(ratios), 3),
                      "factory_tokens_s": round(WORLD * MICRO_BATCH * width / factory_ms * 1e3, 1),
                      "plain_tokens_s": round(WORLD * MICRO_BATCH * width / plain_ms * 1e3, 1),
                      "base": ref.name, "seq_len": width,
                      "world": WORLD, "zero_stage": args.zero_stage}))  # fmt: skip


if __name__ == "__main__":
    main()
