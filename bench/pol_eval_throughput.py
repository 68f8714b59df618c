"""Proof-of-Loss evaluation tokens/s: the factory's evaluator against a plain peft loop.

Both score the same seeded held-out batches with the same LoRA adapter on the same model and
threads, alternating ``--rounds`` times: the factory's :class:`evaluation.proof_of_loss.
PolEvaluator` (``loss(adapter)``: adapter load, inference mode, per-batch loss sums) and a
plain loop over the same PEFT model (``torch.no_grad()``, ``model(input_ids, labels).loss``
per batch). Each round draws a new random adapter, so no loss comes from the evaluator's cache.
Prints both tokens/s per round, their ratio factory / plain and the median of the ratios
(higher is better; goal about 1)::

    python -m bench.pol_eval_throughput --base tiny --blocks 64 --seq-len 64 --rounds 3
    python -m bench.pol_eval_throughput --base .taas/base/gguf-<sha> --threads 2

``--base``: a preset name (``tiny``, ``demo``) or a base model folder (the imported SmolLM2
under ``.taas/base``, for example).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny", help="a preset name or a base model folder")
    parser.add_argument("--home", type=Path, default=REPO / ".cache" / "test")
    parser.add_argument("--blocks", type=int, default=64, help="held-out blocks to build")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="seeded PoL batches per score")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    import torch
    from datasets import Dataset

    from evaluation.proof_of_loss import PolEvaluator
    from factory.base_model import PRESETS, ensure_base_model, folder_ref, load_base
    from factory.corpus import general_text
    from factory.expert import lora_config_dict
    from marketplace.sample import RANK, random_expert

    torch.set_num_threads(args.threads)
    if args.base in PRESETS:
        ref = ensure_base_model(args.home, args.base, log=lambda *_: None)
    else:
        ref = folder_ref(Path(args.base))
    _, tokenizer = load_base(ref.path)
    flat: list[int] = []
    for text in general_text(max_chars=40 * args.blocks * args.seq_len):
        flat.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    width = args.seq_len
    blocks = [flat[i : i + width] for i in range(0, len(flat) - width + 1, width)][: args.blocks]
    work = Path(tempfile.mkdtemp(prefix="taas-pol-bench-"))
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(work / "heldout"))
    config = lora_config_dict(RANK, float(2 * RANK))
    evaluator = PolEvaluator(ref.path, work / "heldout", args.batch_size, args.batches, 0, config)
    tokens = sum(len(indices) for indices in evaluator.batch_indices) * width

    def plain() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for indices in evaluator.batch_indices:
                batch = evaluator.blocks[indices]
                evaluator.model(input_ids=batch, labels=batch).loss.item()
        return time.perf_counter() - started

    rates: dict[str, list[float]] = {"factory": [], "plain": []}
    for round_index in range(args.rounds):
        expert = random_expert(ref, "bench", "bench", seed=round_index + 1)
        started = time.perf_counter()
        evaluator.loss(expert.adapter)  # loads it into the evaluator's slot, then scores
        rates["factory"].append(tokens / (time.perf_counter() - started))
        rates["plain"].append(tokens / plain())  # the same adapter, now loaded
        print(f"round {round_index}: factory {rates['factory'][-1]:.0f} tok/s, "
              f"plain {rates['plain'][-1]:.0f} tok/s", flush=True)  # fmt: skip
    ratios = [f / p for f, p in zip(rates["factory"], rates["plain"], strict=True)]
    print(json.dumps({
        "base": ref.name, "tokens_per_score": tokens, "threads": args.threads,
        "factory_tok_s": round(statistics.median(rates["factory"]), 1),
        "plain_tok_s": round(statistics.median(rates["plain"]), 1),
        "round_ratios": [round(r, 3) for r in ratios],
        "median_round_ratio": round(statistics.median(ratios), 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
