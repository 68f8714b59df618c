"""The training worker: one production line's LoRA training step loop under DeepSpeed.

Run under a distributed launcher (see :mod:`infra.launcher`), which sets RANK / WORLD_SIZE /
LOCAL_RANK::

    torchrun --nproc-per-node 2 -m factory.train --config cfg.json
    deepspeed --num_gpus 2 --no_local_rank --module factory.train --config cfg.json

gloo on CPU, NCCL (+ bf16 when asked) on GPU. The model is the base with a PEFT LoRA adapter on
the MLP projections, trained from ``init_adapter`` (warm start) or from scratch; torch's AdamW is
the client optimizer (no compiled DeepSpeed optimizer is built). The data order is a pure function
of (seed, shard, step), so a resumed run sees exactly the batches an uninterrupted one would.

Protocol on stdout (rank 0): ``TAAS_METRIC {json}`` per step (step, loss = mean over ranks of the
micro-batch mean token cross-entropy, lr, grad_norm before clipping, tokens_per_s, tokens_seen),
``TAAS_EVENT {json}`` for resume / checkpoint events and one ``TAAS_OUTCOME {json}`` line before
exiting (a final outcome from every rank: torchrun may stop rank 0 first). Exit codes: 0 ok,
:data:`EXIT_BAD_CONFIG`, :data:`EXIT_NON_FINITE` and :data:`EXIT_WORKER_ERROR` (final); anything
else (a signal, a lost rank) is an infrastructure failure the launcher treats as retryable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import ValidationError

from factory.hashing import json_sha256
from factory.train_config import TrainConfig
from infra.launcher import EXIT_BAD_CONFIG, EXIT_NON_FINITE, EXIT_WORKER_ERROR, emit, watch_owner

EXIT_RETRYABLE = 1
# Exceptions that the same inputs would raise again: retrying cannot help. RuntimeError and
# OSError are left retryable on purpose: a lost peer surfaces in the survivors as a RuntimeError
# (DistBackendError) from the next collective, and file-system errors can be transient.
_DETERMINISTIC = (
    ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError,
    NotImplementedError, ImportError,
)  # fmt: skip


def shard_rows(num_rows: int, shard_index: int, num_shards: int) -> list[int]:
    """Rows of shard i of n: every n-th row starting at i."""
    return list(range(shard_index, num_rows, num_shards))


def sample_at(position: int, shard_size: int, seed: int, shard_index: int) -> int:
    """Index (into the shard) of sample ``position`` of the endless shuffled stream: epoch
    e = position // shard_size is a permutation seeded by (seed, shard, e)."""
    epoch, offset = divmod(position, shard_size)
    generator = torch.Generator().manual_seed(int(json_sha256([seed, shard_index, epoch])[:15], 16))
    return int(torch.randperm(shard_size, generator=generator)[offset])


def batch_positions(step: int, micro: int, rank: int, world: int, mbs: int, accum: int) -> range:
    """Stream positions of one rank's micro-batch: steps consume world*mbs*accum samples each."""
    start = ((step * accum + micro) * world + rank) * mbs
    return range(start, start + mbs)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0.1 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _die_with_parent() -> None:
    # torchrun starts ranks in their own sessions; if the launcher is SIGKILLed they must not
    # linger holding ports and files, so ask the kernel to kill them with their parent.
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the launcher's tree kill still applies


def load_config(path: Path) -> TrainConfig:
    return TrainConfig.model_validate_json(Path(path).read_text())


def _lora_params(module) -> list[tuple[str, torch.nn.Parameter]]:
    """(adapter key as saved by PEFT, parameter) for every trainable LoRA tensor."""
    return [
        (name.replace(".default.", "."), p)
        for name, p in module.named_parameters()
        if p.requires_grad
    ]


def gather_adapter(engine, rank: int) -> dict[str, torch.Tensor] | None:
    """Full LoRA tensors on rank 0 (collective: under ZeRO-3 the shards are gathered)."""
    import deepspeed

    named = _lora_params(engine.module)
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        if rank != 0:
            return None
        return {key: p.detach().to("cpu", torch.float32).clone() for key, p in named}


def _build_model(config: TrainConfig):
    from peft import LoraConfig, PeftModel, get_peft_model

    from factory.base_model import load_base
    from factory.expert import ADAPTER_CONFIG, lora_config_dict

    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    base, _ = load_base(config.base_model_path, dtype=dtype)
    base.config.use_cache = False
    if config.init_adapter is not None:
        model = PeftModel.from_pretrained(base, config.init_adapter, is_trainable=True)
        adapter_config = json.loads((Path(config.init_adapter) / ADAPTER_CONFIG).read_text())
    else:
        targets = tuple(sorted(config.target_modules))
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=list(targets),
            lora_dropout=0.0,
            bias="none",
        )
        model = get_peft_model(base, lora)
        adapter_config = lora_config_dict(config.lora_rank, config.lora_alpha, targets)
    return model, adapter_config


def _clips_locally(config: TrainConfig) -> bool:
    """fp32 ZeRO-0 gradients are whole on every rank after DeepSpeed's all-reduce, so their norm
    needs no communication; DeepSpeed's own clipping would all-reduce it once more (it averages
    norms for mixture-of-experts layers), a second collective every step. ZeRO 1-3 and bf16 keep
    DeepSpeed's clipping: there the gradients are partitioned or held by its optimizer wrapper."""
    return config.zero_stage == 0 and config.precision == "fp32"


def ds_config(config: TrainConfig, world: int) -> dict:
    """The DeepSpeed config the line runs with: the worker's own, with the user's overlay
    (validated, hash-checked) deep-merged over it. Written beside the checkpoints."""
    from infra.hardware import deep_merge, read_ds_overlay

    own = _own_ds_config(config, world)
    if config.ds_config_overlay is None:
        return own
    return deep_merge(
        own, read_ds_overlay(config.ds_config_overlay, config.ds_config_overlay_sha256)
    )


def _own_ds_config(config: TrainConfig, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch_size * config.grad_accum * world,
        "gradient_clipping": 0.0 if _clips_locally(config) else config.max_grad_norm,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": config.precision == "bf16"},
        "zero_optimization": {
            "stage": config.zero_stage,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def run(config: TrainConfig, rank: int) -> int:
    """Trains one line to ``config.steps``, resuming from the newest valid checkpoint."""
    import datasets
    import deepspeed
    import torch.distributed as dist

    from factory import checkpoint
    from factory.candidate import CandidateManifest, write_candidate
    from factory.hashing import tensors_sha256
    from factory.signing import load_private_key
    from infra.atomic import atomic_write_json
    from infra.hardware import dist_backend

    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend=dist_backend(on_gpu))
    world = dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else None
    if device is not None:
        torch.cuda.set_device(device)
    config_sha = config.sha256()

    rows = datasets.load_from_disk(str(Path(config.data_path) / "train")).with_format("torch")
    all_ids = rows["input_ids"]
    shard = all_ids[shard_rows(len(all_ids), config.shard_index, config.num_shards)]
    seq_len = shard.shape[1]

    torch.manual_seed(config.seed)
    model, adapter_config = _build_model(config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps)
    )
    line_ds_config = ds_config(config, world)
    if rank == 0:  # what this line ran with, beside its checkpoints
        Path(config.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(config.checkpoint_dir) / "ds_config.json", line_ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=trainable,
        config=line_ds_config,
    )

    def barrier() -> None:
        dist.barrier()

    def broadcast_path(value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # Rank 0 picks the checkpoint so every rank resumes from the same one.
    found = checkpoint.latest_valid(config.checkpoint_dir) if rank == 0 else None
    found = broadcast_path(str(found[1]) if found else None)
    start_step, tokens_seen = 0, 0
    if found is not None:
        state = json.loads((Path(found) / checkpoint.STATE_FILE).read_text())
        if state.get("config_sha256") == config_sha:
            state = checkpoint.load(Path(found), engine, rank)
            start_step, tokens_seen = state["next_step"], state["tokens_seen"]
            if rank == 0:
                emit("TAAS_EVENT", {"event": "resume", "step": start_step, "path": found})
        elif rank == 0:
            emit("TAAS_EVENT", {"event": "checkpoint_ignored", "reason": "config_mismatch"})

    clip_locally = _clips_locally(config)
    # With ZeRO-0 gradients in param.grad and one micro-batch per step, a skipped step is undone
    # by dropping the gradients, so the backward pass may start before the ranks agree on the
    # losses: the agreement then costs no barrier of its own. Elsewhere (partitioned gradients,
    # accumulation) the ranks agree first.
    overlap = clip_locally and config.grad_accum == 1
    injected = set(config.inject_nonfinite_steps)
    nonfinite_in_row, seen_nonfinite = 0, False
    last_loss = float("nan")
    engine.train()
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        losses = []
        for micro in range(config.grad_accum):
            positions = batch_positions(
                step, micro, rank, world, config.micro_batch_size, config.grad_accum
            )
            idx = [sample_at(p, len(shard), config.seed, config.shard_index) for p in positions]
            batch = shard[idx] if device is None else shard[idx].to(device)
            loss = engine(input_ids=batch, labels=batch).loss
            if step in injected:
                loss = loss * float("nan")
            losses.append(loss)
        # Every rank must take the same decision, or the collectives below would hang. One
        # all-reduce carries both numbers: how many ranks saw a non-finite loss, and the loss sum.
        detached = torch.stack([x.detach().float() for x in losses])
        stats = torch.stack([(~torch.isfinite(detached)).any().float(), detached.mean()])
        if overlap:  # runs during the backward pass instead of as a barrier of its own
            pending = dist.all_reduce(stats, async_op=True)
            engine.backward(losses[0])
            pending.wait()
        else:
            dist.all_reduce(stats)  # on the losses' device: NCCL on GPU, gloo on CPU
        nonfinite_ranks, loss_sum = stats.tolist()
        if nonfinite_ranks > 0:
            if overlap:
                engine.zero_grad()  # this batch's gradients are dropped: no optimizer step
            nonfinite_in_row += 1
            seen_nonfinite = True
            if rank == 0:
                emit("TAAS_EVENT", {"event": "non_finite_loss", "step": step})
            if nonfinite_in_row >= config.max_nonfinite:
                # Every rank reports a final outcome: torchrun stops the others as soon as one
                # rank exits, so rank 0 may be killed before it could write its line.
                emit("TAAS_OUTCOME", {"outcome": "final", "reason": "non_finite_loss"})
                return EXIT_NON_FINITE
            continue
        nonfinite_in_row = 0
        grad_norm = None
        for loss in losses:
            if not overlap:
                engine.backward(loss)
            if clip_locally and engine.is_gradient_accumulation_boundary():
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            engine.step()
        if grad_norm is None:  # DeepSpeed clipped: it keeps the norm it measured
            grad_norm = engine.get_global_grad_norm()
        tokens_seen += world * config.micro_batch_size * config.grad_accum * seq_len
        last_loss = loss_sum / world
        elapsed = time.perf_counter() - started
        if rank == 0:
            emit(
                "TAAS_METRIC",
                {
                    "step": step + 1,
                    "loss": last_loss,
                    "lr": engine.get_lr()[0],
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "tokens_per_s": world
                    * config.micro_batch_size
                    * config.grad_accum
                    * seq_len
                    / elapsed,
                    "tokens_seen": tokens_seen,
                },
            )
        done = step + 1
        # After a non-finite loss the state is suspect: keep the last clean checkpoint.
        if done % config.checkpoint_every == 0 and done < config.steps and not seen_nonfinite:
            adapter = gather_adapter(engine, rank)
            hook = None
            if config.kill_during_save_at_step == done:

                def hook() -> None:
                    import signal

                    os.killpg(os.getpgid(0), signal.SIGKILL)

            state = {"next_step": done, "tokens_seen": tokens_seen, "config_sha256": config_sha}
            path = checkpoint.save(
                config.checkpoint_dir,
                done,
                engine,
                adapter,
                state,
                rank,
                barrier,
                broadcast_path,
                on_files_written=hook,
            )
            if rank == 0:
                checkpoint.prune(config.checkpoint_dir, config.keep_last)
                emit("TAAS_EVENT", {"event": "checkpoint", "step": done, "path": str(path)})

    adapter = gather_adapter(engine, rank)
    if rank == 0:
        manifest = CandidateManifest(
            candidate_id=f"{config.expert_id}-c{config.cycle}-{config.contributor_id}",
            expert_id=config.expert_id,
            cycle=config.cycle,
            contributor_id=config.contributor_id,
            base_model_sha256=config.base_model_sha256,
            parent_adapter_sha256=config.parent_adapter_sha256,
            adapter_sha256=tensors_sha256(adapter),
            data_shard=f"{config.shard_index}/{config.num_shards}",
            seed=config.seed,
            steps=config.steps,
            tokens_seen=tokens_seen,
            created_at=datetime.now(UTC).isoformat(),
        )
        key = load_private_key(config.key_path)
        write_candidate(config.output_dir, adapter, adapter_config, manifest, key)
        emit(
            "TAAS_OUTCOME",
            {
                "outcome": "ok",
                "reason": "",
                "candidate_path": str(config.output_dir),
                "final_loss": last_loss,
                "tokens_seen": tokens_seen,
                "config_sha256": config_sha,
            },
        )
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    watch_owner(EXIT_RETRYABLE)
    rank = int(os.environ.get("RANK", "0"))
    try:
        config = load_config(args.config)
        from infra.hardware import select_precision

        select_precision(config.precision)  # bf16 without CUDA: a bad config, not a crash
        from factory.base_model import base_model_sha256

        if base_model_sha256(config.base_model_path) != config.base_model_sha256:
            raise ValueError("base_model_sha256 does not match the folder at base_model_path")
        check_inputs(config)
    except (ValidationError, ValueError, OSError) as exc:
        # Every rank reports (see the non-finite abort): the first to exit ends the job.
        emit("TAAS_OUTCOME", {"outcome": "final", "reason": "bad_config", "detail": str(exc)})
        return EXIT_BAD_CONFIG
    try:
        return run(config, rank)
    except Exception as exc:
        traceback.print_exc()
        code = exit_code_for(exc)
        if code == EXIT_WORKER_ERROR:  # any rank may be the one that failed: each reports
            detail = f"rank {rank}: {type(exc).__name__}: {exc}"
            emit("TAAS_OUTCOME", {"outcome": "final", "reason": "worker_error", "detail": detail})
        return code


def exit_code_for(exc: BaseException) -> int:
    """EXIT_WORKER_ERROR (final) for an exception the same inputs would raise again, else
    EXIT_RETRYABLE (the launcher retries a lost peer or an I/O fault)."""
    return EXIT_WORKER_ERROR if isinstance(exc, _DETERMINISTIC) else EXIT_RETRYABLE


def check_inputs(config: TrainConfig) -> None:
    """Fails fast, before any process group exists, on inputs a run could never use: ValueError
    naming the field."""
    import datasets

    from factory.expert import ADAPTER_CONFIG, ADAPTER_FILE
    from factory.signing import load_private_key

    train = Path(config.data_path) / "train"
    try:
        columns = datasets.load_from_disk(str(train)).column_names
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"data_path: no tokenized train split at {train} ({exc})") from None
    if "input_ids" not in columns:
        raise ValueError(f"data_path: {train} has no input_ids column (columns: {columns})")
    if config.init_adapter is not None:
        for name in (ADAPTER_CONFIG, ADAPTER_FILE):
            if not (Path(config.init_adapter) / name).is_file():
                raise ValueError(f"init_adapter: {config.init_adapter} has no {name}")
    try:
        load_private_key(config.key_path)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"key_path: {config.key_path} is not a readable ed25519 key") from exc
    if config.ds_config_overlay is not None:
        from infra.hardware import read_ds_overlay

        read_ds_overlay(config.ds_config_overlay, config.ds_config_overlay_sha256)


if __name__ == "__main__":
    sys.exit(main())
