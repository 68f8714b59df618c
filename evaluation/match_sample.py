"""A buyer's sample text for a library match: read, packed into blocks, and its domain words.

:func:`read_sample` accepts JSONL (one JSON object per line with a string ``text`` field) or
plain UTF-8 text (paragraphs split on blank lines), at most ``max_bytes``; anything else is a
one-line ``ValueError`` starting ``sample:``. The sample is only ever held in memory for the
match. :func:`domain_words` keeps what the demand board may record: the most frequent content
words (lower-case letters only, 3-24 long, not in :data:`STOP_WORDS`), never the text itself.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence

import torch

MAX_SAMPLE_BYTES = 1024 * 1024
MAX_BLOCKS = 64
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
STOP_WORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    shall may must might upon within without via per any every each one two three use used using
    """.split()
)


def read_sample(data: bytes, name: str = "sample", max_bytes: int = MAX_SAMPLE_BYTES) -> list[str]:
    """The sample's texts; ValueError ``sample: ...`` (one line, naming ``name``) when it is
    empty, over ``max_bytes``, not UTF-8, or JSONL whose line lacks a string ``text``."""
    if len(data) > max_bytes:
        raise ValueError(f"sample: {name} is {len(data)} bytes; send at most {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"sample: {name} is not UTF-8 text; save it as UTF-8") from None
    stripped = text.lstrip("\ufeff").strip()
    if not stripped:
        raise ValueError(f"sample: {name} is empty; send some of your text")
    if name.endswith(".jsonl") or stripped.startswith("{"):
        texts = []
        for number, line in enumerate(stripped.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"sample: {name} line {number} is not JSON; fix it") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(
                    f"sample: {name} line {number} has no string field 'text'; add one"
                )
            texts.append(row["text"])
        return [t for t in texts if t.strip()]
    return [p.strip() for p in re.split(r"\n\s*\n", stripped) if p.strip()]


def sample_blocks(
    texts: Sequence[str], tokenizer, seq_len: int, max_blocks: int = MAX_BLOCKS
) -> torch.Tensor:
    """The texts tokenized, joined with EOS and cut into at most ``max_blocks`` blocks of
    ``seq_len`` tokens ([N, seq_len] LongTensor); ValueError when not one block fills."""
    flat: list[int] = []
    for ids in tokenizer(list(texts))["input_ids"]:
        flat.extend([*ids, tokenizer.eos_token_id])
        if len(flat) >= seq_len * max_blocks:
            break
    count = min(len(flat) // seq_len, max_blocks)
    if count == 0:
        raise ValueError(
            f"sample: {len(flat)} tokens is too short; send at least {seq_len} tokens of text"
        )
    return torch.tensor(flat[: count * seq_len], dtype=torch.long).view(count, seq_len)


def domain_words(texts: Sequence[str], top: int = 8) -> list[str]:
    """The ``top`` most frequent content words of the texts (ties alphabetical)."""
    counts: Counter[str] = Counter()
    for text in texts:
        for word in _WORD.findall(text.lower()):
            if 3 <= len(word) <= 24 and word not in STOP_WORDS:
                counts[word] += 1
    return [word for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
