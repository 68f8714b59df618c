"""Completions that arrive together decode as one batch, each getting what it would alone: over
HTTP (/v1/completions from parallel clients) and through the generator directly."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from test_marketplace import build_market, new_buyer

from marketplace.app import create_app
from marketplace.demo import ExpertHandle

PROMPTS = [
    "The licensee shall",
    "Permission is hereby granted, free of charge, to any person",
    "x = ",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR",
    "Redistribution and use in source and binary forms",
    "def main():",
]


@pytest.fixture(scope="module")
def market(tiny_base, tmp_path_factory):
    return build_market(tiny_base, tmp_path_factory.mktemp("batch-market"))


def handles_of(market, names):
    return [ExpertHandle(n, "1", market.catalog.expert_folder(n, "1")) for n in names]


def test_completions_arriving_together_decode_as_one_batch_with_their_own_results(market):
    generator = market.generator
    handles = handles_of(market, ["law-expert", "tax-expert"])
    lengths = [5, 12, 1, 8, 12, 3]  # rows end at different steps, each at its own limit
    alone = [
        list(generator.stream(handles, prompt, n))
        for prompt, n in zip(PROMPTS, lengths, strict=True)
    ]
    before = generator.batches
    barrier = threading.Barrier(len(PROMPTS))
    results: dict[int, tuple[int, list]] = {}

    def ask(i: int) -> None:
        barrier.wait()
        results[i] = generator.complete(handles, PROMPTS[i], lengths[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batches = generator.batches - before
    assert batches < len(PROMPTS), (
        f"{batches} batches for {len(PROMPTS)} requests arriving together"
    )
    for i, prompt in enumerate(PROMPTS):
        prompt_tokens, tokens = results[i]
        assert prompt_tokens == len(generator.prompt_ids(prompt))
        assert tokens == alone[i], prompt  # same tokens, text pieces and routes as alone
        assert len(tokens) <= lengths[i]
    # a request alone is a batch of one
    assert generator.complete(handles, PROMPTS[0], 5)[1] == alone[0]


def test_parallel_api_clients_get_what_each_would_alone(market):
    buyer, _, headers = new_buyer(market, "Batcher", [("law-expert", "usage")])
    bodies = [{"model": "law-expert", "prompt": p, "max_tokens": 6} for p in PROMPTS]
    with TestClient(create_app(market)) as client:
        alone = [client.post("/v1/completions", json=b, headers=headers).json() for b in bodies]
        before = market.generator.batches
        barrier = threading.Barrier(len(bodies))
        answers: dict[int, dict] = {}

        def ask(i: int) -> None:
            barrier.wait()
            answers[i] = client.post("/v1/completions", json=bodies[i], headers=headers).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert market.generator.batches - before < len(bodies)
    for i in range(len(bodies)):
        assert answers[i]["choices"] == alone[i]["choices"]
        assert answers[i]["usage"] == alone[i]["usage"]
