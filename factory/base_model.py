"""The embedded base model: a small Llama-architecture causal LM built and pretrained locally.

Nothing is downloaded. A byte-level BPE tokenizer is trained with ``tokenizers`` on the general
corpus (standard-library docstrings, see :mod:`factory.corpus`), then a Llama model is pretrained
briefly on CPU on the same text. The result is a plain Hugging Face folder (config.json,
model.safetensors, tokenizer files) cached under ``<home>/base/<name>`` as a committed folder, and
identified in provenance by :func:`base_model_sha256`.

Run ``python -m factory.base_model`` to build the demo preset and print its hash.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from factory.corpus import general_text
from factory.hashing import json_sha256, tensors_sha256
from infra.atomic import atomic_write_json, committed_dir, verify_committed

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class BasePreset:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    seq_len: int
    pretrain_steps: int
    batch_size: int
    lr: float
    corpus_chars: int
    seed: int = 0


PRESETS = {
    "demo": BasePreset(
        name="taas-embedded-demo",
        vocab_size=4096,
        hidden_size=192,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        seq_len=128,
        pretrain_steps=240,
        batch_size=16,
        lr=3e-3,
        corpus_chars=1_200_000,
    ),
    # Tests: a few layers, hidden 32, a short pretraining so losses are meaningful.
    "tiny": BasePreset(
        name="taas-embedded-tiny",
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        seq_len=64,
        pretrain_steps=60,
        batch_size=16,
        lr=5e-3,
        corpus_chars=200_000,
    ),
}


@dataclass(frozen=True)
class BaseModelRef:
    """How provenance names a base model: a name, a local folder and a content hash."""

    name: str
    path: Path
    sha256: str


def base_model_sha256(folder: Path) -> str:
    """sha256 over the model tensors (sorted keys) and the tokenizer and config files."""
    folder = Path(folder)
    parts = {"weights": tensors_sha256(load_file(folder / "model.safetensors"))}
    for name in ("tokenizer.json", "config.json"):
        parts[name] = json_sha256(json.loads((folder / name).read_text()))
    return json_sha256(parts)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS
    )


def _packed_blocks(token_lists: list[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_base_model(folder: Path, preset: BasePreset, log=print) -> None:
    """Trains the tokenizer, pretrains the model, writes a committed HF folder at ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.time()
    texts = general_text(max_chars=preset.corpus_chars)
    tokenizer = train_tokenizer(texts, preset.vocab_size)
    blocks = _packed_blocks(
        tokenizer(texts)["input_ids"], tokenizer.eos_token_id, preset.seq_len + 1
    )
    log(f"[base] corpus {len(texts)} paragraphs, {blocks.numel():,} tokens")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=max(512, 4 * preset.seq_len),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(preset.seed)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01)
    warmup = max(1, preset.pretrain_steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, preset.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(preset.seed)
    model.train()
    for step in range(preset.pretrain_steps):
        idx = torch.randint(0, blocks.shape[0], (preset.batch_size,), generator=generator)
        batch = blocks[idx]
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 40 == 0 or step == preset.pretrain_steps - 1:
            log(f"[base] pretrain step {step + 1}/{preset.pretrain_steps} loss {loss.item():.3f}")
    model.eval()
    with committed_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / "taas_base.json",
            {"preset": asdict(preset), "build_seconds": round(time.time() - started, 1)},
        )


def ensure_base_model(home: Path, preset_name: str = "demo", log=print) -> BaseModelRef:
    """Returns the cached base model for a preset, building it first when absent or torn."""
    preset = PRESETS[preset_name]
    folder = Path(home) / "base" / f"{preset.name}-{json_sha256(asdict(preset))[:12]}"
    if not verify_committed(folder):
        log(f"[base] building embedded base model {preset.name} (one time, cached in {folder})")
        build_base_model(folder, preset, log=log)
    return BaseModelRef(name=preset.name, path=folder, sha256=base_model_sha256(folder))


# transformers' from_pretrained swaps PreTrainedModel.tie_weights, init_weights and the
# torch.nn.init functions for the duration of a load and puts back what it saw on entry. Two
# threads loading at once (the marketplace's first concurrent requests, concurrent Prefect tasks)
# can each put back the other's no-op, after which every load in the process has an untied,
# uninitialised lm_head. Loads are therefore serialised process-wide.
_LOAD_LOCK = threading.Lock()


def load_base(path: Path, dtype: torch.dtype = torch.float32):
    """Loads a base model folder (safetensors only) and its tokenizer; safe to call from threads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(".taas"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    args = parser.parse_args()
    ref = ensure_base_model(args.home, args.preset)
    print(json.dumps({"name": ref.name, "path": str(ref.path), "sha256": ref.sha256}))
