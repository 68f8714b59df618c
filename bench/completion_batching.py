"""Completions that arrive together, batched, against the same completions one after another.

The marketplace's generator (:class:`marketplace.demo.RoutedGenerator`) over sample experts on a
base (``--preset``), ``--requests`` prompts of ``--max-tokens`` tokens: sent one at a time
(each its own decode), then all at once from as many threads (decoded together, see
:meth:`RoutedGenerator.complete`), alternating ``--rounds`` times. Prints generated tokens/s of
both and their ratio (batched / one at a time)::

    python -m bench.completion_batching --preset tiny --requests 8 --max-tokens 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The licensee shall",
    "Permission is hereby granted, free of charge,",
    "Redistribution and use in source and binary forms",
    "THE SOFTWARE IS PROVIDED AS IS",
    "Subject to the terms and conditions of this License",
    "You may not use this file except",
    "Each Contributor hereby grants to You",
    "This program is free software; you can redistribute it",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--home", type=Path, default=REPO / ".cache" / "test")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    import torch

    from factory.base_model import ensure_base_model
    from marketplace.demo import ExpertHandle, RoutedGenerator
    from marketplace.sample import sample_catalog

    torch.set_num_threads(args.threads)
    base = ensure_base_model(args.home, args.preset, log=lambda *_: None)
    domains = ["law", "medicine", "finance", "tax", "code", "chem", "music", "sport"]
    catalog = sample_catalog(base, Path(tempfile.mkdtemp()), domains[: args.experts])
    handles = [ExpertHandle(e.name, "1", catalog.expert_folder(e.name, "1"))
               for e in catalog.entries()]  # fmt: skip
    generator = RoutedGenerator(base.path, 256, args.max_tokens)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]

    def one_at_a_time() -> int:
        return sum(len(generator.complete(handles, p, args.max_tokens)[1]) for p in prompts)

    def together() -> int:
        counts = [0] * len(prompts)

        def ask(i: int) -> None:
            counts[i] = len(generator.complete(handles, prompts[i], args.max_tokens)[1])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts)

    one_at_a_time()  # compose the mixture and warm up
    rates: dict[str, list[float]] = {"one_at_a_time": [], "together": []}
    for _ in range(args.rounds):
        for name, run in (("one_at_a_time", one_at_a_time), ("together", together)):
            started = time.perf_counter()
            tokens = run()
            rates[name].append(tokens / (time.perf_counter() - started))
        print(f"one at a time {rates['one_at_a_time'][-1]:.0f} tok/s, "
              f"together {rates['together'][-1]:.0f} tok/s", flush=True)  # fmt: skip
    ratios = [t / o for t, o in zip(rates["together"], rates["one_at_a_time"], strict=True)]
    print(json.dumps({
        "preset": args.preset, "experts": args.experts, "requests": args.requests,
        "max_tokens": args.max_tokens, "threads": args.threads,
        "one_at_a_time_tok_s": round(statistics.median(rates["one_at_a_time"]), 1),
        "together_tok_s": round(statistics.median(rates["together"]), 1),
        "median_ratio": round(statistics.median(ratios), 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
