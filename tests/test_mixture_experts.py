"""Tiny LoRA experts on two clearly different synthetic domains, shared by the mixture tests.

- "digits": arithmetic lines such as ``17 + 25 = 42 ; 3 * 9 = 27 ;`` from a seeded generator;
- "licence": licence files shipped by installed packages (factory.corpus.licence_files);
- "general": standard-library docstrings (factory.corpus.general_text), the base's own text.

Experts are trained with plain torch + peft for a few dozen steps and cached per process, so the
test modules that import this one train each expert once. The test here checks that the experts
are real: each lowers the loss on its own domain's held-out blocks and not on the other's.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch

from factory.base_model import load_base
from factory.corpus import general_text, licence_files
from factory.expert import Expert, ExpertManifest, lora_config_dict, parse_adapter_key
from factory.hashing import tensors_sha256
from factory.mixture import MixtureModel

SEQ_LEN = 32
RANK = 4


def digits_text(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        op = rng.choice("+*")
        lines.append(f"{a} {op} {b} = {a + b if op == '+' else a * b} ;")
    return [" ".join(lines[i : i + 8]) for i in range(0, len(lines), 8)]


def licence_text() -> list[str]:
    """MIT and BSD licence texts: boilerplate with varying copyright lines, a learnable domain."""
    texts = [p.read_text(errors="replace") for p in licence_files()]
    markers = ("Permission is hereby granted, free of charge", "Redistribution and use in source")
    return [t for t in texts if any(m in t for m in markers)]


def pack(texts: list[str], tokenizer, seq_len: int = SEQ_LEN) -> torch.Tensor:
    flat: list[int] = []
    for ids in tokenizer(texts)["input_ids"]:
        flat.extend(ids + [tokenizer.eos_token_id])
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


@functools.lru_cache(maxsize=4)
def domain_blocks(base_path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{domain: (train_blocks, heldout_blocks)}: 48 training and 16 held-out blocks each."""
    _, tokenizer = load_base(Path(base_path))
    texts = {
        "digits": digits_text(1200, seed=1),
        "licence": licence_text(),
        "general": general_text(max_chars=60_000),
    }
    out = {}
    for domain, domain_texts in texts.items():
        blocks = pack(domain_texts, tokenizer)
        generator = torch.Generator().manual_seed(7)
        blocks = blocks[torch.randperm(blocks.shape[0], generator=generator)]
        assert blocks.shape[0] >= 64, (domain, blocks.shape)
        out[domain] = (blocks[:48], blocks[48:64])
    return out


@functools.lru_cache(maxsize=4)
def train_expert(base_path: str, base_sha256: str, domain: str, steps: int = 40) -> Expert:
    """A rank-4 LoRA on gate/up/down trained ``steps`` AdamW steps on the domain's blocks."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    model, _ = load_base(Path(base_path))
    config = lora_config_dict(RANK, 8.0)
    peft_model = get_peft_model(model, LoraConfig(**{**config, "inference_mode": False}))
    train, _ = domain_blocks(base_path)[domain]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    peft_model.train()
    for _ in range(steps):
        batch = train[torch.randint(0, train.shape[0], (8,), generator=generator)]
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    num_layers = model.config.num_hidden_layers
    assert {parse_adapter_key(k)[0] for k in adapter} == set(range(num_layers))
    manifest = ExpertManifest(
        expert_id=f"{domain}-expert",
        domain=domain,
        version=1,
        base_model="taas-embedded-tiny",
        base_model_sha256=base_sha256,
        adapter_sha256=tensors_sha256(adapter),
        rank=RANK,
        lora_alpha=8.0,
        target_modules=sorted(config["target_modules"]),
        num_layers=num_layers,
    )
    router = torch.zeros(num_layers, model.config.hidden_size)
    return Expert(manifest=manifest, adapter=adapter, adapter_config=config, router=router)


def experts_for(tiny_base) -> tuple[Expert, Expert]:
    args = (str(tiny_base.path), tiny_base.sha256)
    return train_expert(*args, "digits"), train_expert(*args, "licence")


def test_experts_specialise_on_their_own_domain(tiny_base):
    digits, licence = experts_for(tiny_base)
    base, _ = load_base(tiny_base.path)
    mixture = MixtureModel.from_experts(base, [digits, licence])
    blocks = domain_blocks(str(tiny_base.path))
    losses = {}
    for route in ("base", "digits-expert", "licence-expert"):
        with mixture.forced_route(route):
            losses[route] = {d: mixture.lm_loss(blocks[d][1]) for d in ("digits", "licence")}
    # Each expert beats the base on its own domain by a clear margin...
    assert losses["digits-expert"]["digits"] < losses["base"]["digits"] - 0.5
    assert losses["licence-expert"]["licence"] < losses["base"]["licence"] - 0.1
    # ...and beats the other expert there: the two domains are distinguishable by loss.
    assert losses["digits-expert"]["digits"] < losses["licence-expert"]["digits"]
    assert losses["licence-expert"]["licence"] < losses["digits-expert"]["licence"]
