"""Mixture forward throughput as the library grows: tokens/s at E = 1, 4, 16, 64 experts, top-2.

A demo-sized Llama (hidden 192, intermediate 512, 4 layers, vocab 4096; random weights: speed
does not depend on the values) with rank-8 LoRA experts on gate/up/down and random router rows.
Runs alternate between the sizes within one process (round-robin, several rounds) so drift in
the machine's load hits every size alike; the median per size is reported, then the ratio
tokens/s(E=64) / tokens/s(E=1) (goal >= 0.8: the cost per token stays flat as E grows).

    OMP_NUM_THREADS=1 python -m bench.mixture_throughput [--rounds 5] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from factory.expert import Expert, ExpertManifest, adapter_key, lora_config_dict
from factory.hashing import tensors_sha256
from factory.mixture import MixtureModel

SIZES = (1, 4, 16, 64)


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
            adapter[adapter_key(layer, projection, "A")] = (
                torch.randn(rank, d_in, generator=generator) * 0.02
            )
            adapter[adapter_key(layer, projection, "B")] = (
                torch.randn(d_out, rank, generator=generator) * 0.02
            )
    manifest = ExpertManifest(
        expert_id=f"bench-{index}",
        domain="bench",
        version=0,
        base_model="bench",
        base_model_sha256="0" * 64,
        adapter_sha256=tensors_sha256(adapter),
        rank=rank,
        lora_alpha=16.0,
        target_modules=sorted(dims),
        num_layers=config.num_hidden_layers,
    )
    router = torch.randn(config.num_hidden_layers, config.hidden_size, generator=generator)
    return Expert(manifest, adapter, lora_config_dict(rank, 16.0), router)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    base = LlamaForCausalLM(config).eval()
    experts = [random_expert(i, config) for i in range(max(SIZES))]
    mixtures = {e: MixtureModel.from_experts(base, experts[:e], top_k=2) for e in SIZES}
    ids = torch.randint(
        0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    )
    tokens = ids.numel()
    rates: dict[int, list[float]] = {e: [] for e in SIZES}
    with torch.no_grad():
        for mixture in mixtures.values():
            mixture(ids)  # warm-up
        base_rates = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            base(input_ids=ids)
            base_rates.append(tokens / (time.perf_counter() - started))
            for size, mixture in mixtures.items():
                started = time.perf_counter()
                mixture(ids)
                rates[size].append(tokens / (time.perf_counter() - started))
    print(f"threads {torch.get_num_threads()}, {tokens} tokens per forward, {args.rounds} rounds")
    print(f"{'experts':>8} {'tokens/s':>12}")
    print(f"{'base':>8} {statistics.median(base_rates):>12.0f}")
    for size in SIZES:
        print(f"{size:>8} {statistics.median(rates[size]):>12.0f}")
    ratio = statistics.median(rates[64]) / statistics.median(rates[1])
    print(f"ratio E=64 / E=1: {ratio:.3f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
