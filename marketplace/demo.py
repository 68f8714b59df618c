"""Generation with a per-token expert route, for the live demo and the completions API.

:class:`RoutedGenerator` holds the base model once and loads each expert's PEFT LoRA adapter on
first use (safetensors only). Decoding is greedy. With one expert every token is generated and
routed through it. With several (a buyer's mixture), each token is routed to the expert whose
router rows best match the base model's hidden states at the last position:
``route = argmax_e mean_l <router_e[l], h_l>`` where ``h_l`` is the input of layer ``l``; the
token is then generated with that expert's adapter. The model is shared between requests, so
each decoding step runs under one lock (the adapter switch and the forward pass together).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from factory.base_model import load_base
from factory.expert import ROUTER_FILE


@dataclass(frozen=True)
class RoutedToken:
    token_id: int
    text: str  # the text this token adds to the output
    expert: str
    version: str


@dataclass(frozen=True)
class ExpertHandle:
    """An expert resolved through the catalog: never built from request text."""

    name: str
    version: str
    folder: Path


class RoutedGenerator:
    def __init__(self, base_path: Path, max_prompt_tokens: int, max_new_tokens: int):
        self.model, self.tokenizer = load_base(Path(base_path))
        self.model.eval()
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self._peft = None
        self._adapters: dict[Path, tuple[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a prompt; ValueError naming the limit when it is too long."""
        if len(prompt) > 8 * self.max_prompt_tokens:
            raise ValueError(f"prompt: at most {self.max_prompt_tokens} tokens; shorten it")
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"prompt: {len(ids)} tokens, at most {self.max_prompt_tokens}; shorten it"
            )
        if not ids:
            raise ValueError("prompt: must not be empty")
        return ids

    def _adapter(self, handle: ExpertHandle) -> tuple[str, torch.Tensor]:
        """Loads the adapter once; returns its PEFT adapter name and router rows."""
        if handle.folder not in self._adapters:
            from peft import PeftModel

            name = "e" + hashlib.sha256(str(handle.folder).encode()).hexdigest()[:12]
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, handle.folder, adapter_name=name)
                self._peft.eval()
            else:
                self._peft.load_adapter(handle.folder, adapter_name=name)
            router = load_file(str(handle.folder / ROUTER_FILE))["router"].float()
            self._adapters[handle.folder] = (name, router)
        return self._adapters[handle.folder]

    def _route(self, ids: torch.Tensor, handles: list[ExpertHandle]) -> ExpertHandle:
        if len(handles) == 1:
            return handles[0]
        with self._peft.disable_adapter():
            hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states
        scores = []
        for handle in handles:
            _, router = self._adapters[handle.folder]
            layers = min(router.shape[0], len(hidden) - 1)
            rows = torch.stack([hidden[layer][0, -1] for layer in range(layers)])
            scores.append(float((rows * router[:layers]).sum(-1).mean()))
        return handles[max(range(len(handles)), key=lambda i: scores[i])]

    def stream(
        self, handles: list[ExpertHandle], prompt: str, max_new_tokens: int
    ) -> Iterator[RoutedToken]:
        """Greedy tokens one at a time, each with the expert it was routed to."""
        if not handles:
            raise ValueError("model: no expert to generate with")
        if not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_tokens: must be between 1 and {self.max_new_tokens}")
        ids = self.prompt_ids(prompt)
        generated: list[int] = []
        text_so_far = ""
        eos = self.tokenizer.eos_token_id
        for _ in range(max_new_tokens):
            with self._lock, torch.inference_mode():
                for handle in handles:
                    self._adapter(handle)
                current = torch.tensor([ids + generated])
                chosen = self._route(current, handles)
                self._peft.set_adapter(self._adapters[chosen.folder][0])
                logits = self._peft(input_ids=current).logits[0, -1]
                token = int(torch.argmax(logits))
            if token == eos:
                break
            generated.append(token)
            text = self.tokenizer.decode(generated)
            piece, text_so_far = text[len(text_so_far) :], text
            yield RoutedToken(token, piece, chosen.name, chosen.version)
