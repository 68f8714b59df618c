"""Generation with a per-token expert route, for the live demo and the completions API.

:class:`RoutedGenerator` holds the base model once and composes the requested experts into a
routed mixture (:class:`factory.mixture.MixtureModel`, cached per set of expert folders; the
mixtures share the base model). Decoding is greedy, one token at a time with the base's KV cache
(:func:`factory.mixture.stream_routes`), and each token is handed out as it is decoded, so the
live demo streams.
As in :func:`factory.mixture.generate_with_routes`, a token's route is the majority over layers
of the top-1 route at the position that predicted it; ``"base"`` is the mixture's null route
(the base model alone). The model is shared between requests, so each decoding step runs under
one lock; a mixture is composed once per set of experts (least recently used dropped).
Requests of one set of experts that arrive within :data:`BATCH_WINDOW_S` of each other, streamed
(:meth:`RoutedGenerator.stream`, the live demo) or whole (:meth:`RoutedGenerator.complete`, the
completions API), decode together in a thread of their own, as one left-padded batch with one KV
cache: one forward per step for all of them instead of one each. Routing is per token, so a
row's routes and tokens are what it would get alone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from factory.base_model import format_prompt, load_base
from factory.expert import load_expert
from factory.mixture import BASE_ROUTE, MixtureModel, mixture_of, stream_routes

MAX_MIXTURES = 16  # expert sets kept composed; each shares the base model
BATCH_WINDOW_S = 0.01  # how long the first of a batch waits for others to join it
MAX_BATCH = 8  # rows decoded together; more waiting requests decode in further batches


@dataclass(frozen=True)
class RoutedToken:
    token_id: int
    text: str  # the text this token adds to the output
    expert: str  # catalog name of the expert it was routed to, or "base"
    version: str  # that expert's version, or the base model's name


@dataclass(frozen=True)
class ExpertHandle:
    """An expert resolved through the catalog: never built from request text."""

    name: str
    version: str
    folder: Path


@dataclass
class _Waiting:
    """One request of a batch: its prompt, then its tokens as they are decoded (a
    :class:`RoutedToken` each; ``None`` at its end, or the exception that ended the batch)."""

    ids: list[int]
    max_new_tokens: int
    tokens: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False  # its reader stopped (a closed stream): decoding drops the row


class RoutedGenerator:
    def __init__(
        self, base_path: Path, max_prompt_tokens: int, max_new_tokens: int, top_k: int = 2
    ):
        self.model, self.tokenizer = load_base(Path(base_path))
        self.model.eval()
        self.base_name = Path(base_path).name
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.top_k = top_k
        self._mixtures: OrderedDict[
            tuple[Path, ...], tuple[MixtureModel, dict[str, ExpertHandle]]
        ] = OrderedDict()
        self._lock = threading.Lock()  # decoding: a forward patches the shared base's MLPs
        self._cache_lock = threading.Lock()  # the mixture cache only, never during a forward
        self._building: dict[tuple[Path, ...], threading.Lock] = {}
        self._waiting: dict[tuple[Path, ...], list[_Waiting]] = {}  # under _cache_lock
        self.builds = 0  # mixtures built so far (read by tests and metrics)
        self.batches = 0  # batches decoded so far (read by tests and metrics)

    def prompt_ids(self, prompt: str | list[dict[str, str]], chat: bool = False) -> list[int]:
        """Token ids of a prompt (``chat``: one user turn through the base's chat template; a
        list of messages is always a chat, see :func:`factory.base_model.format_prompt`);
        ValueError naming the limit when it is too long or empty."""
        given = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
        if len(given) > 8 * self.max_prompt_tokens:
            raise ValueError(f"prompt: at most {self.max_prompt_tokens} tokens; shorten it")
        chat = chat or not isinstance(prompt, str)
        text = format_prompt(self.tokenizer, prompt, chat) if given.strip() else given
        # a chat template already holds the special tokens it needs
        ids = self.tokenizer(text, add_special_tokens=text == prompt)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"prompt: {len(ids)} tokens, at most {self.max_prompt_tokens}; shorten it"
            )
        if not ids:
            raise ValueError("prompt: must not be empty")
        return ids

    def _mixture(self, handles: list[ExpertHandle]) -> tuple[MixtureModel, dict[str, ExpertHandle]]:
        """The mixture over these experts; route name -> handle. Cached, least recently used
        dropped past ``MAX_MIXTURES``; built once per set, however many requests ask for it
        together, and once per request (not per decoding step). Reading and checking the
        experts' files happens outside the decoding lock, so requests on other mixtures keep
        decoding meanwhile; only composing holds it: it reads the shared base's MLPs, which a
        running forward swaps out."""
        key = tuple(sorted(handle.folder for handle in handles))
        with self._cache_lock:
            if key in self._mixtures:
                self._mixtures.move_to_end(key)
                return self._mixtures[key]
            building = self._building.setdefault(key, threading.Lock())
        with building:
            with self._cache_lock:
                if key in self._mixtures:
                    return self._mixtures[key]
            experts = [load_expert(handle.folder) for handle in handles]
            with self._lock:
                mixture = mixture_of(self.model, experts, top_k=self.top_k).eval()
            by_route = {
                expert.manifest.expert_id: handle
                for expert, handle in zip(mixture.experts, handles, strict=True)
            }
            with self._cache_lock:
                self.builds += 1
                self._mixtures[key] = (mixture, by_route)
                while len(self._mixtures) > MAX_MIXTURES:
                    self._mixtures.popitem(last=False)
                self._building.pop(key, None)
            return mixture, by_route

    def stream(
        self,
        handles: list[ExpertHandle],
        prompt: str | list[dict[str, str]],
        max_new_tokens: int,
        chat: bool = False,
    ) -> Iterator[RoutedToken]:
        """Greedy tokens as they are decoded, each with the expert it was routed to; decoded in
        one batch with the requests of the same experts that arrive together (module doc)."""
        self._check_request(handles, max_new_tokens)
        yield from self._tokens_of(
            self._submit(handles, self.prompt_ids(prompt, chat), max_new_tokens)
        )

    def _check_request(self, handles: list[ExpertHandle], max_new_tokens: int) -> None:
        if not handles:
            raise ValueError("model: no expert to generate with")
        if not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_tokens: must be between 1 and {self.max_new_tokens}")

    def _next_piece(self, generated: list[int], text_so_far: str) -> tuple[str, str]:
        """(the text the newest of ``generated`` adds, the whole text so far): decoding the
        whole prefix, since one token alone may decode to part of a character."""
        text = self.tokenizer.decode(generated)
        return text[len(text_so_far) :], text

    def _routed(
        self, token: int, piece: str, route: str, by_route: dict[str, ExpertHandle]
    ) -> RoutedToken:
        if route == BASE_ROUTE:
            return RoutedToken(token, piece, BASE_ROUTE, self.base_name)
        handle = by_route[route]
        return RoutedToken(token, piece, handle.name, handle.version)

    def complete(
        self,
        handles: list[ExpertHandle],
        prompt: str | list[dict[str, str]],
        max_new_tokens: int,
        chat: bool = False,
    ) -> tuple[int, list[RoutedToken]]:
        """A whole completion, (prompt tokens, tokens), as :meth:`stream` gives it."""
        self._check_request(handles, max_new_tokens)
        ids = self.prompt_ids(prompt, chat)
        return len(ids), list(self._tokens_of(self._submit(handles, ids, max_new_tokens)))

    def _submit(self, handles: list[ExpertHandle], ids: list[int], max_new_tokens: int) -> _Waiting:
        """Queues a request for decoding. The first of a set of experts to arrive starts a
        decoding thread, which waits :data:`BATCH_WINDOW_S` for others to join, then decodes
        them all; the requests' own threads only read their tokens, so a slow or closed
        stream never holds up the rest of its batch."""
        mine = _Waiting(ids, max_new_tokens)
        key = tuple(sorted(handle.folder for handle in handles))
        with self._cache_lock:
            waiting = self._waiting.setdefault(key, [])
            waiting.append(mine)
            first = len(waiting) == 1
        if first:
            threading.Thread(
                target=self._decode_arrivals, args=(key, handles), name="taas-decode", daemon=True
            ).start()
        return mine

    def _tokens_of(self, mine: _Waiting) -> Iterator[RoutedToken]:
        try:
            while (item := mine.tokens.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            mine.cancelled = True  # read to the end, or the reader went away

    def _decode_arrivals(self, key: tuple[Path, ...], handles: list[ExpertHandle]) -> None:
        time.sleep(BATCH_WINDOW_S)  # the others of this batch join meanwhile
        with self._cache_lock:
            arrived = self._waiting.pop(key)
        batches = [
            arrived[start : start + MAX_BATCH] for start in range(0, len(arrived), MAX_BATCH)
        ]
        # Batches past the first decode in threads of their own, interleaved step by step with
        # this one, so no request waits for a whole batch ahead of it.
        for rows in batches[1:]:
            threading.Thread(
                target=self._decode_batch, args=(handles, rows), name="taas-decode", daemon=True
            ).start()
        self._decode_batch(handles, batches[0])

    def _decode_batch(self, handles: list[ExpertHandle], rows: list[_Waiting]) -> None:
        with self._cache_lock:  # counted first: its rows may be read out before it returns
            self.batches += 1
        try:
            self._decode_together(handles, rows)
        except BaseException as exc:  # every row of it is told, not left waiting
            for row in rows:
                row.tokens.put(exc)
        finally:
            for row in rows:
                row.tokens.put(None)  # a no-op for a row that ended or failed already

    def _decode_together(self, handles: list[ExpertHandle], rows: list[_Waiting]) -> None:
        """Greedy decoding of the rows as one left-padded batch, each row's tokens handed to it
        as they come; a row ends at its EOS (not kept), after its own ``max_new_tokens``, or when
        its reader goes away."""
        mixture, by_route = self._mixture(handles)
        width = max(len(row.ids) for row in rows)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        ids_BT = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in rows])
        mask_BT = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows])
        longest = max(row.max_new_tokens for row in rows)
        steps = stream_routes(mixture, ids_BT, mask_BT, max_new_tokens=longest)
        eos = self.tokenizer.eos_token_id
        new_ids: list[list[int]] = [[] for _ in rows]
        texts = [""] * len(rows)
        open_rows = [True] * len(rows)
        for _ in range(longest):
            with self._lock, torch.inference_mode():  # one step per hold: batches interleave
                step = next(steps)
            tokens, routes = step.token_ids_B.tolist(), step.route_ids_B.tolist()
            for i, row in enumerate(rows):
                if not open_rows[i]:
                    continue
                if tokens[i] == eos or row.cancelled:
                    open_rows[i] = False
                    row.tokens.put(None)
                    continue
                new_ids[i].append(tokens[i])
                piece, texts[i] = self._next_piece(new_ids[i], texts[i])
                route = mixture.route_name(routes[i])
                row.tokens.put(self._routed(tokens[i], piece, route, by_route))
                if len(new_ids[i]) >= row.max_new_tokens:
                    open_rows[i] = False
                    row.tokens.put(None)
            if not any(open_rows):
                break
