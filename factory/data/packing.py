"""Tokenization and packing into fixed blocks, cached by content hash.

Rows are tokenized with the base model's tokenizer (``datasets.map``), each followed by one EOS
token, concatenated and cut into blocks of exactly ``seq_len`` tokens; the tail that does not fill
a block is dropped (per map batch of :data:`PACK_BATCH` rows). The result is a ``datasets`` folder
with one column ``input_ids``. It is cached as a committed folder under
``<cache_root>/<key>`` with ``key = sha256(rows sha256, tokenizer sha256, seq_len)``, so a rerun on
the same rows and tokenizer does no tokenization at all (:attr:`PackResult.cache_hit`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from factory.hashing import json_sha256
from infra.atomic import atomic_write_json, committed_dir, verify_committed

PACK_BATCH = 1000
BLOCKS_DIR = "blocks"
META_FILE = "pack.json"


@dataclass(frozen=True)
class PackResult:
    """``path``: a datasets folder of [num_blocks] rows of ``seq_len`` ids.

    ``num_tokens`` counts every row's tokens plus its EOS, before packing drops any tail.
    """

    path: Path
    num_blocks: int
    num_tokens: int
    cache_hit: bool


def tokenizer_sha256(base_model_path: Path) -> str:
    """sha256 of the canonical JSON of the model folder's ``tokenizer.json``."""
    return json_sha256(json.loads((Path(base_model_path) / "tokenizer.json").read_text()))


def rows_sha256(rows: Iterable[str]) -> str:
    """sha256 over the rows in order, each length-prefixed so boundaries count."""
    digest = hashlib.sha256()
    for text in rows:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def pack_key(rows: Iterable[str], tokenizer_sha: str, seq_len: int) -> str:
    return json_sha256({"rows": rows_sha256(rows), "tokenizer": tokenizer_sha, "seq_len": seq_len})


def pack_rows(
    rows: Sequence[str], base_model_path: Path, seq_len: int, cache_root: Path
) -> PackResult:
    """Tokenizes and packs ``rows`` (or reuses the cached result for the same content)."""
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=".rows-") as spool:
        path = Path(spool) / "rows.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(jsonl_line(text) for text in rows)
        return pack_jsonl(path, base_model_path, seq_len, cache_root)


def jsonl_line(text: str) -> str:
    """One row as the factory's data files hold it: ``{"text": ...}`` and a newline."""
    return json.dumps({"text": text}, ensure_ascii=False) + "\n"


def jsonl_texts(path: Path) -> Iterator[str]:
    """The texts of a file of :func:`jsonl_line` rows, one at a time."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)["text"]


def pack_jsonl(path: Path, base_model_path: Path, seq_len: int, cache_root: Path) -> PackResult:
    """:func:`pack_rows` over the rows of a JSONL file of :func:`jsonl_line` rows, read from
    disk as they are tokenized (datasets' Arrow files under a temporary folder of
    ``cache_root``), never all at once in memory; the same key for the same rows."""
    key = pack_key(jsonl_texts(path), tokenizer_sha256(base_model_path), seq_len)
    folder = Path(cache_root) / key
    if verify_committed(folder):
        meta = json.loads((folder / META_FILE).read_text())
        return PackResult(folder / BLOCKS_DIR, meta["num_blocks"], meta["num_tokens"], True)

    import pyarrow.compute
    from datasets import Dataset, Features, Value, disable_progress_bars
    from transformers import AutoTokenizer

    disable_progress_bars()  # per-batch bars would flood flow logs

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    eos = tokenizer.eos_token_id
    assert eos is not None, "base model tokenizer has no EOS token"

    def tokenize(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [row + [eos] for row in ids], "n": [len(row) + 1 for row in ids]}

    def pack(batch: dict) -> dict:
        flat = [t for row in batch["ids"] for t in row]
        usable = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, usable, seq_len)]}

    Path(cache_root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=".arrow-") as arrow:
        dataset = Dataset.from_json(
            str(path), features=Features({"text": Value("string")}), cache_dir=arrow
        )
        tokenized = dataset.map(tokenize, batched=True, remove_columns=["text"])
        num_tokens = pyarrow.compute.sum(tokenized.data.column("n")).as_py() or 0
        blocks = tokenized.map(
            pack, batched=True, batch_size=PACK_BATCH, remove_columns=["ids", "n"]
        )
        with committed_dir(folder, overwrite=True) as tmp:
            blocks.save_to_disk(str(tmp / BLOCKS_DIR))
            atomic_write_json(
                tmp / META_FILE, {"num_blocks": len(blocks), "num_tokens": num_tokens}
            )
        num_blocks = len(blocks)
        del dataset, tokenized, blocks  # their Arrow files go with the temporary folder
    return PackResult(folder / BLOCKS_DIR, num_blocks, num_tokens, False)
