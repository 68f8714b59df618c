"""prepare_data: a commission's sources -> a committed, tokenized, split data folder.

Steps: fetch sources (verified bytes, sha256) -> stream rows -> quality checks and exact dedupe ->
contamination removal -> held-out split by row hash -> tokenize and pack (cached). The output
folder (written with :func:`infra.atomic.committed_dir`, so nothing is half-written) holds::

    train/    datasets.save_to_disk, one column "input_ids": lists of exactly seq_len ints
    heldout/  same format
    train.jsonl, heldout.jsonl   one {"text": ...} per row (after quality/dedupe/contamination)
    data.json  dataset_sha256, file_sha256 {uri: sha}, seq_len, tokenizer_sha256,
               num_train_rows, num_heldout_rows, num_train_blocks, num_heldout_blocks,
               heldout_tokens, quality, contamination (+ prepare_key, mixture, token_cap)

Rows are streamed: kept rows are written to files as they are read (a temporary folder beside
``out_dir``), and the mixture and packing read them back from there, so memory holds two digests
and an offset per row, never the rows. Training blocks come from the weighted mixture of
sources (:func:`factory.data.split.mix_order`), truncated to ``budget.token_cap`` tokens when
set; held-out blocks are every held-out row once. ``heldout_tokens`` counts held-out row tokens
plus one EOS per row.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from factory.commission import CommissionSpec, spec_sha256
from factory.data.contamination import ContaminationCheck, ContaminationReport
from factory.data.packing import jsonl_line, pack_jsonl, tokenizer_sha256
from factory.data.quality import QualityReport, iter_clean_rows
from factory.data.sources import SourceFile, dataset_sha256, fetch_sources, iter_rows
from factory.data.split import is_heldout, mix_order
from factory.hashing import json_sha256
from infra.atomic import atomic_write_json, committed_dir, verify_committed
from infra.settings import Settings

DATA_JSON = "data.json"


@dataclass(frozen=True)
class PreparedData:
    """A committed data folder and its data.json fields; ``cache_hit``: packing was reused."""

    root: Path
    dataset_sha256: str
    file_sha256: dict[str, str]
    seq_len: int
    tokenizer_sha256: str
    num_train_rows: int
    num_heldout_rows: int
    num_train_blocks: int
    num_heldout_blocks: int
    heldout_tokens: int
    quality: dict[str, Any]
    contamination: dict[str, Any]
    cache_hit: bool = False

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def heldout_dir(self) -> Path:
        return self.root / "heldout"

    @property
    def train_jsonl(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def heldout_jsonl(self) -> Path:
        return self.root / "heldout.jsonl"

    def train_blocks(self) -> torch.Tensor:
        """LongTensor [num_train_blocks, seq_len]."""
        return _blocks(self.train_dir)

    def heldout_blocks(self) -> torch.Tensor:
        """LongTensor [num_heldout_blocks, seq_len]."""
        return _blocks(self.heldout_dir)

    @classmethod
    def load(cls, root: Path, cache_hit: bool = False) -> PreparedData:
        """Reads a committed data folder; refuses one without a valid commit marker."""
        root = Path(root)
        if not verify_committed(root):
            raise ValueError(f"{root}: not a committed data folder; run prepare_data again")
        meta = json.loads((root / DATA_JSON).read_text())
        names = {f.name for f in fields(cls)} - {"root", "cache_hit"}
        return cls(root=root, cache_hit=cache_hit, **{k: meta[k] for k in names})


def _blocks(folder: Path) -> torch.Tensor:
    from datasets import load_from_disk

    dataset = load_from_disk(str(folder))
    if len(dataset) == 0:
        return torch.empty(0, 0, dtype=torch.long)
    return dataset.with_format("torch")[:]["input_ids"].to(torch.long)


def _prepare_key(spec: CommissionSpec, data_sha: str, tok_sha: str, items: Sequence[str]) -> str:
    relevant = spec.model_dump(
        mode="json", include={"data", "budget", "heldout", "quality", "seed"}
    )
    return json_sha256(
        {
            "spec": relevant,
            "data": data_sha,
            "tokenizer": tok_sha,
            "items": json_sha256(list(items)),
        }
    )


def prepare_data(
    spec: CommissionSpec,
    base_model_path: Path,
    out_dir: Path,
    settings: Settings,
    *,
    benchmark_items: Sequence[str] = (),
    files: list[SourceFile] | None = None,
) -> PreparedData:
    """Writes the committed data folder ``out_dir`` (see module docstring) and describes it.

    ``benchmark_items``: texts of benchmark items to decontaminate against. ``files``: sources
    already fetched by :func:`fetch_sources` (fetched here when absent). A folder already holding
    the same preparation (same data, spec sections, tokenizer, items) is returned as it is.
    """
    files = fetch_sources(spec, settings) if files is None else files
    data_sha = dataset_sha256(files)
    tok_sha = tokenizer_sha256(base_model_path)
    key = _prepare_key(spec, data_sha, tok_sha, benchmark_items)
    out_dir = Path(out_dir)
    if verify_committed(out_dir):
        existing = json.loads((out_dir / DATA_JSON).read_text())
        if existing.get("prepare_key") == key:
            return PreparedData.load(out_dir, cache_hit=True)

    report = QualityReport()
    contamination = ContaminationCheck(benchmark_items)
    # Kept rows go to disk as they come (train and held-out files, with each training row's
    # offset per source for the mixture): memory holds digests and offsets, not the rows.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.rows-") as tmp:
        spool = Path(tmp)
        rows = iter_clean_rows(iter_rows(spec, files, settings, report), spec.quality.min_chars,
                               report)  # fmt: skip
        split = _spool_rows(rows, contamination, spec, spool)
        return _prepare_from_spool(
            spec, settings, base_model_path, out_dir, files, data_sha, tok_sha, key, report,
            contamination.report(), split, spool,
        )  # fmt: skip


@dataclass
class _Split:
    """Where the kept rows were written: byte offsets of each source's training rows in
    ``train.jsonl`` (in order) and the number of held-out rows in ``heldout.jsonl``."""

    train_offsets: list[array]
    heldout_rows: int = 0

    @property
    def train_rows(self) -> int:
        return sum(len(offsets) for offsets in self.train_offsets)


def _spool_rows(
    rows: Iterable[tuple[int, str]],
    contamination: ContaminationCheck,
    spec: CommissionSpec,
    spool: Path,
) -> _Split:
    if not 0.0 < spec.heldout.fraction < 1.0:
        raise ValueError(
            f"heldout.fraction: {spec.heldout.fraction} must lie strictly between 0 and 1"
        )
    split = _Split([array("q") for _ in spec.data])
    with open(spool / "train.jsonl", "wb") as train, open(spool / "heldout.jsonl", "wb") as held:
        for row_index, (source_index, text) in enumerate(rows):
            if contamination.flags(row_index, text):
                continue
            line = jsonl_line(text).encode("utf-8")
            if is_heldout(text, spec.seed, spec.heldout.fraction):
                held.write(line)
                split.heldout_rows += 1
            else:
                split.train_offsets[source_index].append(train.tell())
                train.write(line)
    return split


def _prepare_from_spool(
    spec: CommissionSpec,
    settings: Settings,
    base_model_path: Path,
    out_dir: Path,
    files: list[SourceFile],
    data_sha: str,
    tok_sha: str,
    key: str,
    report: QualityReport,
    contamination: ContaminationReport,
    split: _Split,
    spool: Path,
) -> PreparedData:
    if report.rows_in == 0:
        raise ValueError("data: the sources hold no rows; add data to the sources")
    if not report.rows_kept:
        raise ValueError(
            f"data: every row was filtered out ({report.summary()}); fix the data or lower "
            "quality.min_chars"
        )
    if report.rows_kept == len(contamination.flagged):
        raise ValueError("data: every row overlaps a benchmark item; add uncontaminated data")
    if not split.train_rows:
        raise ValueError(
            "data: no training rows after the split; add data or lower heldout.fraction"
        )

    seq_len = spec.budget.seq_len
    cache_root = settings.home / "cache" / "packed"
    heldout_pack = (
        pack_jsonl(spool / "heldout.jsonl", base_model_path, seq_len, cache_root)
        if split.heldout_rows
        else None
    )
    heldout_tokens = heldout_pack.num_tokens if heldout_pack else 0
    if heldout_tokens < spec.heldout.min_tokens or not heldout_pack or not heldout_pack.num_blocks:
        raise ValueError(
            f"held-out too small for Proof-of-Loss: {heldout_tokens} tokens < "
            f"{spec.heldout.min_tokens}; add data or raise heldout.fraction"
        )
    mixed = _write_mixture(spool, split, spec.source_weights(), spec.seed)
    train_pack = pack_jsonl(spool / "mixed.jsonl", base_model_path, seq_len, cache_root)
    num_train_blocks = train_pack.num_blocks
    if spec.budget.token_cap is not None:
        num_train_blocks = min(num_train_blocks, spec.budget.token_cap // seq_len)
    if num_train_blocks == 0:
        raise ValueError(
            f"data: training data fills no block of {seq_len} tokens; add data or lower "
            "budget.seq_len (or raise budget.token_cap)"
        )

    meta = {
        "dataset_sha256": data_sha,
        "file_sha256": {f.uri: f.sha256 for f in files},
        "seq_len": seq_len,
        "tokenizer_sha256": tok_sha,
        "num_train_rows": split.train_rows,
        "num_heldout_rows": split.heldout_rows,
        "num_train_blocks": num_train_blocks,
        "num_heldout_blocks": heldout_pack.num_blocks,
        "heldout_tokens": heldout_tokens,
        "quality": report.to_dict(),
        "contamination": contamination.to_dict(),
        "prepare_key": key,
        "spec_sha256": spec_sha256(spec),
        "mixture": {"weights": spec.source_weights(), "train_rows_mixed": mixed},
        "token_cap": spec.budget.token_cap,
    }
    with committed_dir(out_dir, overwrite=True) as tmp:
        _copy_blocks(train_pack.path, tmp / "train", num_train_blocks, train_pack.num_blocks)
        shutil.copytree(heldout_pack.path, tmp / "heldout")
        for name in ("train.jsonl", "heldout.jsonl"):
            shutil.copyfile(spool / name, tmp / name)
        atomic_write_json(tmp / DATA_JSON, meta)
    return PreparedData.load(out_dir, cache_hit=train_pack.cache_hit and heldout_pack.cache_hit)


def _write_mixture(spool: Path, split: _Split, weights: Sequence[float], seed: int) -> int:
    """Writes ``mixed.jsonl``, the training rows in :func:`factory.data.split.mix_order`'s order
    (read back from ``train.jsonl`` by offset); returns its number of rows."""
    order = mix_order([len(offsets) for offsets in split.train_offsets], weights, seed)
    with open(spool / "train.jsonl", "rb") as rows, open(spool / "mixed.jsonl", "wb") as mixed:
        for source, index in order:
            rows.seek(split.train_offsets[source][index])
            mixed.write(rows.readline())
    return len(order)


def _copy_blocks(source: Path, dest: Path, keep: int, total: int) -> None:
    if keep == total:
        shutil.copytree(source, dest)
        return
    from datasets import load_from_disk

    load_from_disk(str(source)).select(range(keep)).save_to_disk(str(dest))


def base_model_folder(spec: CommissionSpec, settings: Settings) -> Path:
    """The checked base model folder the spec names (see
    :func:`factory.base_model.resolve_base_model`: ``path``, ``gguf``, ``Settings.base_model_dir``
    or a preset, built or imported once)."""
    from factory.base_model import resolve_base_model

    return resolve_base_model(spec.base_model, settings).path
