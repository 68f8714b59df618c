"""Requests that arrive together decode as one batch, each getting what it would alone: whole
completions and token streams, over HTTP (/v1/completions and the live demo's /demo/stream from
parallel clients) and through the generator directly."""

from __future__ import annotations

import json
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
    # a burst large enough for the parallel demo visitors, who all come from one address
    return build_market(tiny_base, tmp_path_factory.mktemp("batch-market"), demo_burst=16)


def handles_of(market, names):
    return [ExpertHandle(n, "1", market.catalog.expert_folder(n, "1")) for n in names]


def in_parallel(count: int, work) -> dict[int, object]:
    """``work(i)`` for i < count, each in a thread, all released at once; their results by i."""
    barrier = threading.Barrier(count)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_completions_arriving_together_decode_as_one_batch_with_their_own_results(market):
    generator = market.generator
    handles = handles_of(market, ["law-expert", "tax-expert"])
    lengths = [5, 12, 1, 8, 12, 3]  # rows end at different steps, each at its own limit
    alone = [
        list(generator.stream(handles, prompt, n))
        for prompt, n in zip(PROMPTS, lengths, strict=True)
    ]
    before = generator.batches
    results = in_parallel(
        len(PROMPTS), lambda i: generator.complete(handles, PROMPTS[i], lengths[i])
    )
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
        answers = in_parallel(
            len(bodies),
            lambda i: client.post("/v1/completions", json=bodies[i], headers=headers).json(),
        )
    assert market.generator.batches - before < len(bodies)
    for i in range(len(bodies)):
        assert answers[i]["choices"] == alone[i]["choices"]
        assert answers[i]["usage"] == alone[i]["usage"]


def test_streams_arriving_together_decode_as_one_batch_and_closing_one_spares_the_rest(market):
    generator = market.generator
    handles = handles_of(market, ["law-expert", "tax-expert"])
    lengths = [5, 12, 1, 8, 12, 3]
    alone = [
        list(generator.stream(handles, prompt, n))
        for prompt, n in zip(PROMPTS, lengths, strict=True)
    ]
    assert all(alone), "every prompt decodes at least one token alone"
    before = generator.batches

    def read(i: int) -> list:
        tokens = generator.stream(handles, PROMPTS[i], lengths[i])
        if i == 1:  # this reader leaves after its first token, as a closed browser tab does
            first = next(tokens)
            tokens.close()
            return [first]
        return list(tokens)

    results = in_parallel(len(PROMPTS), read)
    assert generator.batches - before < len(PROMPTS)
    for i in range(len(PROMPTS)):
        assert results[i] == (alone[i][:1] if i == 1 else alone[i]), PROMPTS[i]


def test_parallel_demo_visitors_stream_in_one_batch_each_as_alone(market):
    generator, limit = market.generator, market.config.demo_max_new_tokens
    handle = market.handle(market.catalog.get("law-expert"))
    prompts = PROMPTS[:4]
    alone = [
        [{"text": t.text, "expert": t.expert} for t in generator.stream([handle], p, limit, True)]
        for p in prompts
    ]
    with TestClient(create_app(market)) as client:
        before = generator.batches

        def visit(i: int) -> list[dict]:
            form = {"expert": "law-expert", "prompt": prompts[i]}
            response = client.post("/demo/stream", data=form)
            assert response.status_code == 200, response.text
            return [json.loads(line) for line in response.text.splitlines()]

        answers = in_parallel(len(prompts), visit)
    assert generator.batches - before < len(prompts)
    for i in range(len(prompts)):
        assert answers[i] == [*alone[i], {"done": True}], prompts[i]
