"""Routed mixture against the bare base: forward tokens/s at E = 1, 4, 16, 64 experts (top-2),
generation tokens/s with the KV cache against the base's own ``generate``, and the forward's peak
memory at E = 64 against E = 1.

Bases: the presets (``--preset tiny demo smollm2-135m-instruct``: the toys built once, the real
default imported once from its GGUF, under ``--home``) and, with ``--base PATH``, any plain Hugging
Face folder. Experts are random rank-8 LoRAs on gate/up/down with random router rows: speed does
not depend on the values, and random rows spread the tokens over every expert (the grouped path's
worst case for the number of matmuls). Within a round every model runs once, in an order that
rotates from round to round, so load from other processes hits all alike; each round gives ratios
against the base measured in the same round, and the medians of those per-round ratios are printed.
Each thread count (``torch.set_num_threads``) is a block of its own. Memory is measured in a fresh
process per size: the rise of the peak resident set (VmHWM, reset through /proc/self/clear_refs)
over the resident set just before one forward. Goals: E=64 >= 0.7x base, E=64 >= 0.9x E=1,
generation >= 0.7x the base's generate, E=64's forward peak <= E=1's plus the stacked factors.

    python -m bench.mixture_throughput [--preset tiny demo smollm2-135m-instruct] [--base PATH]
        [--threads 1 2] [--rounds 7] [--batch 8] [--seq 128] [--new-tokens 32] [--no-memory]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from cli.progress import quiet_libraries
from factory.base_model import PRESETS, REAL_PRESETS, load_base, resolve_base_model
from factory.commission import BaseModelSection
from factory.expert import LORA_TARGETS, Expert, ExpertManifest, adapter_key, lora_config_dict
from factory.hashing import tensors_sha256
from factory.mixture import MixtureModel, stream_routes
from infra.settings import get_settings

SIZES = (1, 4, 16, 64)
PROMPT_TOKENS = 32


def random_expert(index: int, config, rank: int = 8) -> Expert:
    generator = torch.Generator().manual_seed(index)
    dims = {
        "gate_proj": (config.hidden_size, config.intermediate_size),
        "up_proj": (config.hidden_size, config.intermediate_size),
        "down_proj": (config.intermediate_size, config.hidden_size),
    }
    adapter = {}
    for layer in range(config.num_hidden_layers):
        for projection, (d_in, d_out) in dims.items():
            a = torch.randn(rank, d_in, generator=generator) * 0.02
            b = torch.randn(d_out, rank, generator=generator) * 0.02
            adapter[adapter_key(layer, projection, "A")] = a
            adapter[adapter_key(layer, projection, "B")] = b
    manifest = ExpertManifest(
        expert_id=f"bench-{index:02d}",
        domain="bench",
        version=0,
        base_model="bench",
        base_model_sha256="0" * 64,
        adapter_sha256=tensors_sha256(adapter),
        rank=rank,
        lora_alpha=16.0,
        target_modules=sorted(LORA_TARGETS),
        num_layers=config.num_hidden_layers,
    )
    router = torch.randn(config.num_hidden_layers, config.hidden_size, generator=generator)
    return Expert(manifest, adapter, lora_config_dict(rank, 16.0), router)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _alternate(runs: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Seconds per run, every run once per round, the order rotated per round."""
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        runs[name]()  # warm-up
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            seconds[name].append(_timed(runs[name]))
    return seconds


def _ratio(seconds: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of speed(name) / speed(reference) measured in the same round."""
    pairs = zip(seconds[reference], seconds[name], strict=True)
    return statistics.median(ref / mine for ref, mine in pairs)


def _mixtures(base, sizes) -> dict[int, MixtureModel]:
    experts = [random_expert(i, base.config) for i in range(max(sizes))]
    return {e: MixtureModel.from_experts(base, experts[:e], top_k=2).eval() for e in sizes}


def bench_forward(base, mixtures, ids, rounds: int) -> list[str]:
    runs = {"base": lambda: base(input_ids=ids)}
    runs.update({f"E={e}": (lambda m=m: m(ids)) for e, m in mixtures.items()})
    with torch.no_grad():
        seconds = _alternate(runs, rounds)
    lines = [f"  {'forward':<14} {'tokens/s':>10} {'x base':>8}"]
    for name in runs:
        rate = ids.numel() / statistics.median(seconds[name])
        lines.append(f"  {name:<14} {rate:>10.0f} {_ratio(seconds, name, 'base'):>8.3f}")
    lines.append(
        f"  E=64 / base {_ratio(seconds, 'E=64', 'base'):.3f} (goal >= 0.7); "
        f"E=64 / E=1 {_ratio(seconds, 'E=64', 'E=1'):.3f} (goal >= 0.9)"
    )
    return lines


def bench_generation(base, mixtures, vocab_size: int, new_tokens: int, rounds: int) -> list[str]:
    prompt = torch.randint(0, vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator())
    mask = torch.ones_like(prompt)

    def base_generate():
        base.generate(
            prompt,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )

    def mixture_generate(mixture):
        for _ in stream_routes(mixture, prompt, mask, new_tokens):
            pass

    runs = {"base generate": base_generate}
    runs.update({f"E={e}": (lambda m=m: mixture_generate(m)) for e, m in mixtures.items()})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds = _alternate(runs, rounds)
    lines = [f"  {'generation':<14} {'tokens/s':>10} {'x base':>8}   (batch 1, prompt "]
    lines[0] += f"{PROMPT_TOKENS}, {new_tokens} new tokens, KV cache)"
    for name in runs:
        rate = new_tokens / statistics.median(seconds[name])
        lines.append(f"  {name:<14} {rate:>10.0f} {_ratio(seconds, name, 'base generate'):>8.3f}")
    lines.append(f"  E=64 / base generate {_ratio(seconds, 'E=64', 'base generate'):.3f} (>= 0.7)")
    return lines


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_probe(base_path: Path, experts: int, batch: int, seq: int) -> dict:
    """In this (fresh) process: the forward's peak RSS rise at ``experts`` experts (0 = base)."""
    torch.set_num_threads(1)
    base, _ = load_base(base_path)
    base.eval()
    model = _mixtures(base, (experts,))[experts] if experts else base
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator())
    stacks = sum(b.numel() * b.element_size() for b in model.buffers(recurse=False))
    with torch.no_grad():
        model(input_ids=ids)  # warm-up: the allocator and BLAS buffers settle
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        resident = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        model(input_ids=ids)
    peak = _status_kb("VmHWM")
    return {
        "experts": experts,
        "forward_rise_mb": (peak - resident) / 1024,
        "stacks_mb": stacks / 2**20,
    }


def bench_memory(base_path: Path, batch: int, seq: int) -> list[str]:
    results = {}
    for experts in (0, 1, 64):
        command = [sys.executable, "-m", "bench.mixture_throughput", "--memory-probe", str(experts)]
        command += ["--base", str(base_path), "--batch", str(batch), "--seq", str(seq)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
        results[experts] = json.loads(done.stdout.strip().splitlines()[-1])
    one, many = results[1], results[64]
    allowed = one["forward_rise_mb"] + many["stacks_mb"] - one["stacks_mb"]
    return [
        "  memory (1 thread): forward peak RSS rise over resident, MB: "
        + ", ".join(
            f"{'base' if e == 0 else f'E={e}'} {r['forward_rise_mb']:.1f}"
            for e, r in results.items()
        ),
        f"  stacked factors MB: E=1 {one['stacks_mb']:.1f}, E=64 {many['stacks_mb']:.1f}; "
        f"E=64 rise {many['forward_rise_mb']:.1f} vs E=1 rise + extra stacks {allowed:.1f} "
        f"({'met' if many['forward_rise_mb'] <= allowed else 'MISSED'})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", nargs="*", default=["tiny", "demo"], choices=sorted([*PRESETS, *REAL_PRESETS])
    )
    parser.add_argument("--base", type=Path, default=None, help="a plain Hugging Face folder")
    parser.add_argument("--home", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_libraries()
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(args.base, args.memory_probe, args.batch, args.seq)))
        return
    # The operator's TAAS_BASE_MODEL_DIR would replace every preset: each preset is its own base.
    settings = get_settings(home=args.home, base_model_dir=None)
    folders = [
        resolve_base_model(BaseModelSection(preset=name), settings, log=print).path
        for name in args.preset
    ]
    if args.base is not None:
        if not (args.base / "config.json").is_file():
            raise SystemExit(f"--base: {args.base} is not a model folder (no config.json)")
        folders.append(args.base)
    for folder in folders:
        base, _ = load_base(folder)
        base.eval()
        config = base.config
        mixtures = _mixtures(base, SIZES)
        seq = min(args.seq, config.max_position_embeddings - args.new_tokens)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (args.batch, seq), generator=generator)
        print(
            f"\n{folder.name}: L={config.num_hidden_layers} H={config.hidden_size} "
            f"I={config.intermediate_size} V={config.vocab_size}; {ids.numel()} tokens per "
            f"forward (batch {args.batch} x {seq}); {args.rounds} rounds; rank-8 experts, top-2"
        )
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(f" threads {threads}")
            print("\n".join(bench_forward(base, mixtures, ids, args.rounds)))
            lines = bench_generation(
                base, mixtures, config.vocab_size, args.new_tokens, args.rounds
            )
            print("\n".join(lines), flush=True)
        if not args.no_memory:
            print("\n".join(bench_memory(folder, args.batch, seq)), flush=True)


if __name__ == "__main__":
    main()
