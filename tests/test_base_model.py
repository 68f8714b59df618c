"""The embedded base model's loader under concurrency.

transformers' ``from_pretrained`` swaps class attributes and ``torch.nn.init`` functions for the
duration of a load and restores what it saw on entry, so two threads loading at once can leave
the process with weight tying and initialisation switched off for every later load (untied,
uninitialised ``lm_head``: losses of inf). ``load_base`` serialises loads; these tests load from
many threads at once and check that later loads are still the model on disk.
"""

from __future__ import annotations

import threading

import torch
from transformers import PreTrainedModel

from factory.base_model import load_base

THREADS, ROUNDS = 8, 3


def _loss(model) -> float:
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_concurrent_loads_leave_later_loads_intact(tiny_base):
    tie_weights, normal_ = PreTrainedModel.tie_weights, torch.nn.init.normal_
    reference = _loss(load_base(tiny_base.path)[0])
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def load() -> None:
        try:
            barrier.wait()
            model, _ = load_base(tiny_base.path)
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        except BaseException as exc:  # reported below, with the thread's own assertion
            errors.append(exc)

    for _ in range(ROUNDS):
        threads = [threading.Thread(target=load) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert PreTrainedModel.tie_weights is tie_weights and torch.nn.init.normal_ is normal_
    model, _ = load_base(tiny_base.path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert _loss(model) == reference
