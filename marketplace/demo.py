"""Generation with a per-token expert route, for the live demo and the completions API.

:class:`RoutedGenerator` holds the base model once and composes the requested experts into a
routed mixture (:class:`factory.mixture.MixtureModel`, cached per set of expert folders; the
mixtures share the base model). Decoding is greedy, one token at a time with the base's KV cache
(:func:`factory.mixture.stream_routes`), so the demo can stream.
As in :func:`factory.mixture.generate_with_routes`, a token's route is the majority over layers
of the top-1 route at the position that predicted it; ``"base"`` is the mixture's null route
(the base model alone). The model is shared between requests, so each decoding step runs under
one lock; a mixture is composed once per set of experts (least recently used dropped).
Whole completions (:meth:`RoutedGenerator.complete`, the completions API) of one set of experts
that arrive within :data:`BATCH_WINDOW_S` of each other decode together, as one left-padded
batch with one KV cache: one forward per step for all of them instead of one each. Routing is
per token, so a row's routes and tokens are what it would get alone.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
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
    """One completion waiting to be decoded with others of the same experts."""

    ids: list[int]
    max_new_tokens: int
    done: threading.Event
    tokens: list[RoutedToken] | None = None
    error: BaseException | None = None


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
        self.batches = 0  # batches decoded by complete() (read by tests and metrics)

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
        """Greedy tokens one at a time, each with the expert it was routed to."""
        self._check_request(handles, max_new_tokens)
        ids = self.prompt_ids(prompt, chat)
        generated: list[int] = []
        text_so_far = ""
        eos = self.tokenizer.eos_token_id
        mixture, by_route = self._mixture(handles)
        steps = stream_routes(mixture, torch.tensor([ids]), max_new_tokens=max_new_tokens)
        for _ in range(max_new_tokens):
            # One step per hold of the lock, so requests interleave; the KV cache is per request.
            with self._lock, torch.inference_mode():
                step = next(steps)
            token = int(step.token_ids_B[0])
            if token == eos:
                break
            generated.append(token)
            piece, text_so_far = self._next_piece(generated, text_so_far)
            yield self._routed(token, piece, mixture.route_name(int(step.route_ids_B[0])), by_route)

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
        """A whole completion, (prompt tokens, tokens), as :meth:`stream` gives it; decoded in
        one batch with the completions of the same experts that arrive together (see the
        module doc). The first to arrive waits :data:`BATCH_WINDOW_S` and decodes for all."""
        self._check_request(handles, max_new_tokens)
        ids = self.prompt_ids(prompt, chat)
        mine = _Waiting(ids, max_new_tokens, threading.Event())
        key = tuple(sorted(handle.folder for handle in handles))
        with self._cache_lock:
            waiting = self._waiting.setdefault(key, [])
            waiting.append(mine)
            first = len(waiting) == 1
        if first:
            time.sleep(BATCH_WINDOW_S)  # the others of this batch join meanwhile
            with self._cache_lock:
                batch = self._waiting.pop(key)
            for start in range(0, len(batch), MAX_BATCH):
                rows = batch[start : start + MAX_BATCH]
                try:
                    self._decode_together(handles, rows)
                except BaseException as exc:  # every row of it is told, not left waiting
                    for row in rows:
                        row.error = exc
                finally:
                    for row in rows:
                        row.done.set()
        mine.done.wait()
        if mine.error is not None:
            raise mine.error
        return len(ids), mine.tokens or []

    def _decode_together(self, handles: list[ExpertHandle], rows: list[_Waiting]) -> None:
        """Greedy decoding of the rows as one left-padded batch; each row ends at its EOS (not
        kept) or after its own ``max_new_tokens``."""
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
        routes: list[list[int]] = [[] for _ in rows]
        open_rows = [True] * len(rows)
        for _ in range(longest):
            with self._lock, torch.inference_mode():  # one step per hold, as in stream()
                step = next(steps)
            for i, (token, route) in enumerate(
                zip(step.token_ids_B.tolist(), step.route_ids_B.tolist(), strict=True)
            ):
                if not open_rows[i]:
                    continue
                if token == eos:
                    open_rows[i] = False
                    continue
                new_ids[i].append(token)
                routes[i].append(route)
                open_rows[i] = len(new_ids[i]) < rows[i].max_new_tokens
            if not any(open_rows):
                break
        with self._cache_lock:
            self.batches += 1
        for row, ids, row_routes in zip(rows, new_ids, routes, strict=True):
            tokens, text_so_far = [], ""
            for n, (token, route) in enumerate(zip(ids, row_routes, strict=True), start=1):
                piece, text_so_far = self._next_piece(ids[:n], text_so_far)
                tokens.append(self._routed(token, piece, mixture.route_name(route), by_route))
            row.tokens = tokens
