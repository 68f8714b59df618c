"""The routed expert mixture: a base causal LM + E LoRA experts + one token-level router per layer.

Shape suffixes: N tokens (batch x time flattened), B batch, T time, H hidden size, D a
projection's input size, O its output size, E experts, R the largest LoRA rank, K routes kept,
L decoder layers.

Routing at decoder layer ``l`` is computed once from the MLP input ``x_NH`` (the hidden state after
the post-attention norm) and shared by the layer's three projections:

    u_NH             = x_NH - router_center[l]          (the centered router input)
    expert_logits_NE = u_NH @ router_rows[l]^T          (row e = expert e's router row at layer l)
    null_logit_N     = u_NH @ null_rows[l] + null_bias[l]   (the "base only" route)
    probs_N(E+1)     = softmax([expert_logits, null_logit] / temperature)
    chosen = top-k of probs (k = min(top_k, E+1)); weights = probs[chosen] / sum(probs[chosen])

The null route is a learnable per-layer row and bias owned by the mixture (not by any expert);
both start at zero and are trained by router annealing. ``router_center`` is a fixed per-layer
mean of MLP inputs, also owned by the mixture: raw MLP inputs of any two domains share a large
common component (their layer means have cosine ~0.99 on the tiny base), which would make every
row's logit mostly that shared part; subtracting it leaves the part that tells domains apart.
It starts at zero (no centering) and is set once, by the first router annealing; every expert's
rows are relative to it, so it travels with the null route (:meth:`MixtureModel.null_route`).

Each projection P in gate/up/down becomes

    out = W_P x_P + sum_{e in chosen, e != null} weight_e * scaling_e * B_e A_e x_P

where x_P is the projection's own input (the down projection reads the activated product) and
scaling_e = lora_alpha / r (alpha / sqrt(r) for rsLoRA; per module under PEFT's rank_pattern and
alpha_pattern, see :func:`factory.lora.lora_scaling`). Experts' LoRA factors are stacked once per
add/remove into [L, E, R, D] / [L, E, O, R] tensors (ranks zero-padded, scaling folded into B),
then laid out for :mod:`factory.routed_lora`, which applies each expert's factors to the tokens
routed to it as grouped matmuls, so the cost per token stays close to the K chosen experts'
LoRA FLOPs whatever E is. The base model's own modules are left untouched: the routed MLPs are
swapped in for the duration of each forward only, so several mixtures may share one base model.
The route trace (``return_routing``) holds views of tensors the forward computes anyway, and
nothing at all when not asked for.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from factory.expert import LORA_TARGETS, Expert, load_expert, parse_adapter_key
from factory.lora import lora_scaling, module_rank
from factory.routed_lora import (
    RoutePlan,
    route_plan,
    routed_projection,
    weighted_lora_a,
)

BASE_ROUTE = "base"


@dataclass
class LayerRouting:
    """One decoder layer's routing for one forward call."""

    layer: int
    route_ids_BTK: torch.Tensor  # index into MixtureModel.expert_ids; -1 is the null (base) route
    weights_BTK: torch.Tensor  # renormalized over the chosen routes: sums to 1 per token
    probs_BTR: torch.Tensor  # full softmax over E + 1 routes, the null route last
    # logits / temperature behind probs_BTR; keeps its autograd graph when grad is enabled, so a
    # routing loss can be taken from the trace. None under a forced route.
    logits_BTR: torch.Tensor | None = None


def _top_routes(probs_NR: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest probabilities per row, largest first. For k <= 2 over
    many rows by max passes: on CPU, topk over a few dozen columns costs about 8x as much at a
    thousand rows (and about the same at a few)."""
    if k > 2 or probs_NR.shape[0] <= 256:
        return probs_NR.topk(k, dim=-1)
    first_p, first_id = probs_NR.max(-1, keepdim=True)
    if k == 1:
        return first_p, first_id
    second_p, second_id = probs_NR.scatter(-1, first_id, -1.0).max(-1, keepdim=True)
    return torch.cat([first_p, second_p], -1), torch.cat([first_id, second_id], -1)


def majority_route(trace: Sequence[LayerRouting]) -> torch.Tensor:
    """Per token [B, T]: the top-1 route chosen by most layers (-1 = base); ties go to the route
    with the larger mean probability over layers."""
    probs_LBTR = torch.stack([r.probs_BTR for r in trace])
    num_routes = probs_LBTR.shape[-1]
    top1_LBT = torch.stack([r.route_ids_BTK[..., 0] for r in trace]) % num_routes
    votes_BTR = nn.functional.one_hot(top1_LBT, num_routes).sum(0).to(probs_LBTR.dtype)
    best_BT = (votes_BTR + 0.5 * probs_LBTR.mean(0)).argmax(-1)
    return torch.where(best_BT == num_routes - 1, -1, best_BT)


class _RoutedMLP(nn.Module):
    """Stands in for one decoder layer's MLP during a mixture forward."""

    def __init__(self, mixture: MixtureModel, layer: int, mlp: nn.Module):
        super().__init__()
        object.__setattr__(self, "_mixture", mixture)  # not a submodule: avoids a module cycle
        self.layer = layer
        self.mlp = mlp

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        return self._mixture._mlp_forward(self.layer, self.mlp, x_BTH)


class MixtureModel(nn.Module):
    """A base causal LM with routed LoRA experts; see the module docstring for the math."""

    def __init__(self, base_model: nn.Module, top_k: int = 2, temperature: float = 1.0):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        base_model.requires_grad_(False)
        self.base_model = base_model
        config = base_model.config
        self.num_layers, self.hidden_size = config.num_hidden_layers, config.hidden_size
        self.top_k, self.temperature = top_k, float(temperature)
        self.experts: list[Expert] = []
        param = next(base_model.parameters())
        self.router_rows = nn.Parameter(param.new_zeros(self.num_layers, 0, self.hidden_size))
        self.null_rows = nn.Parameter(param.new_zeros(self.num_layers, self.hidden_size))
        self.null_bias = nn.Parameter(param.new_zeros(self.num_layers))
        self.register_buffer("router_center", param.new_zeros(self.num_layers, self.hidden_size))
        self._forced: int | None = None  # None: learned routing; -1: base only; e: expert e
        self._trace: list[LayerRouting] | None = None
        self._fused_router: tuple[torch.Tensor, torch.Tensor] | None = None  # during a forward
        self._captured: list[list[torch.Tensor]] | None = None
        self._restack()

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def from_experts(
        cls, base_model: nn.Module, experts: Sequence[Expert], top_k: int = 2
    ) -> MixtureModel:
        mixture = cls(base_model, top_k=top_k)
        for expert in experts:
            mixture.add_expert(expert)
        return mixture

    @property
    def expert_ids(self) -> list[str]:
        return [e.manifest.expert_id for e in self.experts]

    def route_name(self, route_id: int) -> str:
        return BASE_ROUTE if route_id < 0 else self.expert_ids[route_id]

    def add_expert(self, expert: Expert, router_rows: torch.Tensor | None = None) -> None:
        """Appends an expert and its router rows ([L, H]; default: the expert's own rows)."""
        manifest = expert.manifest
        if manifest.expert_id in self.expert_ids:
            raise ValueError(f"expert_id {manifest.expert_id!r} is already in the mixture")
        rows = expert.router if router_rows is None else router_rows
        if tuple(rows.shape) != (self.num_layers, self.hidden_size):
            raise ValueError(
                f"router rows of {manifest.expert_id!r} have shape {tuple(rows.shape)}; "
                f"expected [num_layers, hidden_size] = [{self.num_layers}, {self.hidden_size}]"
            )
        for key in expert.adapter:
            layer, projection, _ = parse_adapter_key(key)
            if layer >= self.num_layers or projection not in LORA_TARGETS:
                raise ValueError(f"{manifest.expert_id}: adapter key {key} does not fit the base")
        self.experts.append(expert)
        rows = rows.detach().to(self.router_rows)
        self.router_rows = nn.Parameter(torch.cat([self.router_rows.detach(), rows[:, None]], 1))
        self._restack()

    def remove_expert(self, expert_id: str) -> Expert:
        """Removes an expert and its router rows; returns it."""
        if expert_id not in self.expert_ids:
            raise ValueError(f"expert_id {expert_id!r} is not in the mixture {self.expert_ids}")
        index = self.expert_ids.index(expert_id)
        keep = [i for i in range(len(self.experts)) if i != index]
        removed = self.experts.pop(index)
        self.router_rows = nn.Parameter(self.router_rows.detach()[:, keep].clone())
        self._restack()
        return removed

    def copy(self) -> MixtureModel:
        """A new mixture over the same (shared, frozen) base model with its own router tensors."""
        twin = MixtureModel(self.base_model, top_k=self.top_k, temperature=self.temperature)
        twin.experts = list(self.experts)
        twin.router_rows = nn.Parameter(self.router_rows.detach().clone())
        twin.load_null_route(self.null_route())
        twin._restack()
        return twin

    def null_route(self) -> dict[str, torch.Tensor]:
        """The mixture's own router state: null rows [L, H], null bias [L], router center [L, H].

        Saved with an expert as ``null_route.safetensors``; experts' rows only make sense with
        the center they were annealed under, so the center is part of this state."""
        return {
            "null_rows": self.null_rows.detach().clone(),
            "null_bias": self.null_bias.detach().clone(),
            "router_center": self.router_center.detach().clone(),
        }

    def load_null_route(self, state: dict[str, torch.Tensor]) -> None:
        """Loads :meth:`null_route` output; a state saved before centering existed (no
        ``router_center``) means no centering. Other keys in ``state`` are ignored."""
        with torch.no_grad():
            self.null_rows.copy_(state["null_rows"])
            self.null_bias.copy_(state["null_bias"])
            center = state.get("router_center")
            self.router_center.copy_(
                torch.zeros_like(self.router_center) if center is None else center
            )

    def router_state(self) -> dict[str, torch.Tensor]:
        """Everything routing depends on: :meth:`null_route` plus every expert's rows
        (``rows.<expert_id>``, [L, H])."""
        rows = self.router_rows.detach()
        experts = {f"rows.{e}": rows[:, i].clone() for i, e in enumerate(self.expert_ids)}
        return {**self.null_route(), **experts}

    def load_router_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads :meth:`router_state` output; experts without ``rows.<id>`` keep their rows."""
        self.load_null_route(state)
        with torch.no_grad():
            for index, expert_id in enumerate(self.expert_ids):
                if f"rows.{expert_id}" in state:
                    self.router_rows[:, index] = state[f"rows.{expert_id}"]

    def set_router_center(self, center_LH: torch.Tensor) -> None:
        """Sets the per-layer center subtracted from router inputs (see the module docstring)."""
        if tuple(center_LH.shape) != tuple(self.router_center.shape):
            raise ValueError(
                f"router center has shape {tuple(center_LH.shape)}; expected "
                f"[num_layers, hidden_size] = {list(self.router_center.shape)}"
            )
        with torch.no_grad():
            self.router_center.copy_(center_LH)

    def _restack(self) -> None:
        """Stacks every expert's LoRA factors per projection: A [L,E,R,D], B*scaling [L,E,O,R]."""
        param = next(self.base_model.parameters())
        rank = max(
            [module_rank(e.adapter_config, key) for e in self.experts for key in e.adapter],
            default=1,
        )
        mlp = self._layers()[0].mlp
        for projection in LORA_TARGETS:
            linear = getattr(mlp, projection)
            out_dim, in_dim = linear.weight.shape
            a = param.new_zeros(self.num_layers, len(self.experts), rank, in_dim)
            b = param.new_zeros(self.num_layers, len(self.experts), out_dim, rank)
            for e, expert in enumerate(self.experts):
                for key, tensor in expert.adapter.items():
                    layer, proj, part = parse_adapter_key(key)
                    if proj != projection:
                        continue
                    if part == "A":
                        a[layer, e, : tensor.shape[0]] = tensor.to(param)
                    else:
                        scaling = lora_scaling(expert.adapter_config, module=key)
                        b[layer, e, :, : tensor.shape[1]] = tensor.to(param) * scaling
            self.register_buffer(f"lora_A_{projection}", a, persistent=False)
            self.register_buffer(f"lora_B_{projection}", b, persistent=False)
        self._arrange_stacks()

    def _arrange_stacks(self) -> None:
        """Lays the stacks out for the fast paths, in slot order: the experts sorted by id, so a
        token's experts are summed in one order whatever order they were added in (removing and
        re-adding an expert reproduces the logits). ``slot_of_route`` maps a route id to its slot
        (-1, the null route, to E); A stays [L,E,R,D], B becomes B^T*scaling [L,E,R,O] (a plain
        matrix per expert, and [E*R, O] is a free view). The dense path reads gate's and up's A
        as one ``lora_A_gate_up_flat`` [L, 2*E*R, H]. The grouped path reads A^T as plain
        matrices: ``lora_At_down_proj`` [L,E,I,R] and ``lora_At_gate_up`` [L,E,H,2R], gate's and
        up's side by side (they read the same input, so one matmul serves both)."""
        num_experts = len(self.experts)
        order = sorted(range(num_experts), key=lambda e: self.expert_ids[e])
        self._slots = [order.index(e) for e in range(num_experts)]
        device = self.router_rows.device
        slots = torch.tensor([*self._slots, num_experts], dtype=torch.long, device=device)
        self.register_buffer("slot_of_route", slots, persistent=False)
        perm = torch.tensor(order, dtype=torch.long, device=device)
        for projection in LORA_TARGETS:
            a = getattr(self, f"lora_A_{projection}").index_select(1, perm)
            b = getattr(self, f"lora_B_{projection}").index_select(1, perm)
            self.register_buffer(f"lora_A_{projection}", a, persistent=False)
            b = b.transpose(-2, -1).contiguous()
            self.register_buffer(f"lora_B_{projection}", b, persistent=False)
        # Dense path: gate's then up's A as one [2*E*R, H] matrix per layer; the per-projection
        # A stacks become views of it, so the layout costs no memory of its own.
        layers, num_slots, rank, hidden = self.lora_A_gate_proj.shape
        flat = torch.cat([self.lora_A_gate_proj, self.lora_A_up_proj], 1)
        flat = flat.reshape(layers, 2 * num_slots * rank, hidden)
        self.register_buffer("lora_A_gate_up_flat", flat, persistent=False)
        halves = flat.view(layers, 2, num_slots, rank, hidden).unbind(1)
        self.register_buffer("lora_A_gate_proj", halves[0], persistent=False)
        self.register_buffer("lora_A_up_proj", halves[1], persistent=False)
        gate_up = torch.cat([self.lora_A_gate_proj, self.lora_A_up_proj], 2)
        self.register_buffer("lora_At_gate_up", gate_up.transpose(-2, -1).contiguous(), False)
        down = self.lora_A_down_proj.transpose(-2, -1).contiguous()
        self.register_buffer("lora_At_down_proj", down, persistent=False)

    def _layers(self) -> nn.ModuleList:
        return self.base_model.get_decoder().layers

    # ----- routing ------------------------------------------------------------------------
    @contextmanager
    def forced_route(self, route: str) -> Iterator[MixtureModel]:
        """Within the block every token takes one route with weight 1: an expert id or "base"."""
        if route != BASE_ROUTE and route not in self.expert_ids:
            raise ValueError(f"route {route!r}: use 'base' or one of {self.expert_ids}")
        previous = self._forced
        self._forced = -1 if route == BASE_ROUTE else self.expert_ids.index(route)
        try:
            yield self
        finally:
            self._forced = previous

    def _fuse_router(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer the [H, E+1] router matrix (experts' rows, then the null row) and the [E+1]
        bias (0 for experts, the null bias), both divided by the temperature, so one addmm gives
        a layer's logits; built once per forward, inside the autograd graph of the rows."""
        rows_LRH = torch.cat([self.router_rows, self.null_rows[:, None]], 1)
        zeros_LE = self.null_bias.new_zeros(self.num_layers, len(self.experts))
        bias_LR = torch.cat([zeros_LE, self.null_bias[:, None]], 1)
        return rows_LRH.transpose(1, 2) / self.temperature, bias_LR / self.temperature

    def route(self, layer: int, x_NH: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(route_ids_NK with -1 = null, weights_NK, probs_N(E+1), logits_N(E+1) / temperature or
        None under a forced route) for one layer's MLP input."""
        num_experts = len(self.experts)
        if self._forced is not None:
            ids = x_NH.new_full((x_NH.shape[0], 1), self._forced, dtype=torch.long)
            probs = x_NH.new_zeros(x_NH.shape[0], num_experts + 1)
            probs[:, self._forced] = 1.0  # index -1 is the null column, last
            return ids, torch.ones_like(ids, dtype=x_NH.dtype), probs, None
        weight_LHR, bias_LR = self._fused_router or self._fuse_router()
        logits = torch.addmm(bias_LR[layer], x_NH - self.router_center[layer], weight_LHR[layer])
        probs = logits.softmax(-1)
        top_p, top_ids = _top_routes(probs, min(self.top_k, num_experts + 1))
        weights = top_p / top_p.sum(-1, keepdim=True)
        return torch.where(top_ids == num_experts, -1, top_ids), weights, probs, logits

    def _mlp_forward(self, layer: int, mlp: nn.Module, x_BTH: torch.Tensor) -> torch.Tensor:
        lead = x_BTH.shape[:-1]
        x_NH = x_BTH.reshape(-1, x_BTH.shape[-1])
        if self._captured is not None:
            self._captured[layer].append(x_NH.detach())
        ids_NK, weights_NK, probs, logits = self.route(layer, x_NH)
        if self._trace is not None:
            self._trace.append(
                LayerRouting(
                    layer,
                    ids_NK.view(*lead, -1),
                    weights_NK.detach().view(*lead, -1),
                    probs.detach().view(*lead, -1),
                    None if logits is None else logits.view(*lead, -1),
                )
            )
        if not self.experts or self._forced == -1:
            return mlp(x_BTH)
        rank = self.lora_A_gate_proj.shape[2]
        if self._forced is not None:
            plan = RoutePlan(expert=self._slots[self._forced])
        else:
            plan = route_plan(self.slot_of_route[ids_NK], weights_NK, len(self.experts), rank)
        if plan.weights_NE is not None:
            return self._dense_mlp(layer, mlp, x_NH, plan.weights_NE).view(*lead, -1)
        grouped = plan.token_P is not None
        if grouped and plan.token_P.numel() == 0:
            return mlp(x_BTH)  # every token chose the null route

        def project(name: str, inputs: torch.Tensor, h_PR=None) -> torch.Tensor:
            a, b = getattr(self, f"lora_A_{name}")[layer], getattr(self, f"lora_B_{name}")[layer]
            return routed_projection(getattr(mlp, name), inputs, a, b, plan, h_PR)

        h_gate = h_up = h_down = None
        if grouped:  # gate and up read the same input: one gather and one A matmul serve both
            h_P2R = weighted_lora_a(x_NH, self.lora_At_gate_up[layer], plan)
            h_gate, h_up = h_P2R[:, :rank].contiguous(), h_P2R[:, rank:].contiguous()
        hidden = mlp.act_fn(project("gate_proj", x_NH, h_gate)) * project("up_proj", x_NH, h_up)
        if grouped:
            h_down = weighted_lora_a(hidden, self.lora_At_down_proj[layer], plan)
        return project("down_proj", hidden, h_down).view(*lead, -1)

    def _dense_mlp(
        self, layer: int, mlp: nn.Module, x_NH: torch.Tensor, weights_NE
    ) -> torch.Tensor:
        """The routed MLP with every expert's A on every token and each token's weight on each
        expert (0 where not chosen): few ops, for few tokens or few experts. Gate and up share
        one A matmul; each B product is added to the base projection by addmm."""
        num_tokens, num_slots, rank = x_NH.shape[0], *self.lora_A_gate_proj.shape[1:3]
        stacked = num_slots * rank
        b_gate, b_up, b_down = (
            getattr(self, f"lora_B_{name}")[layer].reshape(stacked, -1)
            for name in ("gate_proj", "up_proj", "down_proj")
        )
        h_N2ER = (x_NH @ self.lora_A_gate_up_flat[layer].mT).view(num_tokens, 2, num_slots, rank)
        h_N2M = (h_N2ER * weights_NE[:, None, :, None]).view(num_tokens, 2, stacked)
        gate = torch.addmm(mlp.gate_proj(x_NH), h_N2M[:, 0], b_gate)
        hidden = mlp.act_fn(gate) * torch.addmm(mlp.up_proj(x_NH), h_N2M[:, 1], b_up)
        a_down = self.lora_A_down_proj[layer].reshape(stacked, -1)
        h_NER = (hidden @ a_down.mT).view(num_tokens, num_slots, rank) * weights_NE[..., None]
        return torch.addmm(mlp.down_proj(hidden), h_NER.view(num_tokens, stacked), b_down)

    # ----- what evaluation harnesses expect of a Hugging Face causal LM ------------------
    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def config(self):
        return self.base_model.config

    @property
    def name_or_path(self) -> str:
        return f"mixture({','.join(self.expert_ids) or 'base'})"

    def tie_weights(self) -> None:
        """The base model's embeddings are already tied (or not) as it was built."""

    # ----- forward ------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, return_routing: bool = False, **kwargs):
        """The base model's forward with routed MLPs; with ``return_routing`` also the list of
        :class:`LayerRouting` (one per layer, in layer order)."""
        layers = self._layers()
        originals = [layer.mlp for layer in layers]
        # The stand-ins are built once per base MLP: a decoding step is a forward of its own.
        routed = self.__dict__.setdefault("_routed_mlps", {})
        self._trace = [] if return_routing else None
        try:
            self._fused_router = None if self._forced is not None else self._fuse_router()
            for index, layer in enumerate(layers):
                key = (index, id(originals[index]))  # the stand-in keeps that MLP alive
                if key not in routed:
                    routed[key] = _RoutedMLP(self, index, originals[index])
                layer.mlp = routed[key]
            output = self.base_model(input_ids=input_ids, **kwargs)
        finally:
            for layer, mlp in zip(layers, originals, strict=True):
                layer.mlp = mlp
            trace, self._trace, self._fused_router = self._trace, None, None
        return (output, trace) if return_routing else output

    @torch.no_grad()
    def mlp_inputs(self, blocks_NT: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
        """Per layer, the MLP inputs of every token of ``blocks`` under the current routing."""
        self._captured = [[] for _ in range(self.num_layers)]
        try:
            for start in range(0, blocks_NT.shape[0], batch_size):
                self(blocks_NT[start : start + batch_size])
            return [torch.cat(chunks) for chunks in self._captured]
        finally:
            self._captured = None

    def lm_loss(self, blocks_NT: torch.Tensor, batch_size: int = 16) -> float:
        """Mean next-token cross-entropy over every predicted position of ``blocks`` (no mask)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, blocks_NT.shape[0], batch_size):
                batch = blocks_NT[start : start + batch_size]
                logits = self(batch).logits[:, :-1].float()
                targets = batch[:, 1:]
                total += nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                ).item()
                count += targets.numel()
        return total / max(count, 1)


class DecodeStep(NamedTuple):
    """One decoding step of a batch: the next tokens [B], the route of the position that
    predicted them [B] (-1 = base) and that position's logits [B, V] (fp32)."""

    token_ids_B: torch.Tensor
    route_ids_B: torch.Tensor
    logits_BV: torch.Tensor


@torch.no_grad()
def stream_routes(
    mixture: MixtureModel,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    greedy: bool = True,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[DecodeStep]:
    """Decodes up to ``max_new_tokens`` steps, yielding a :class:`DecodeStep` per step. Rows may
    be left-padded (mask 0); the caller decides when a row or the whole batch is finished and
    stops iterating.

    With ``use_cache`` the prompt runs once and each step feeds only the new token with the
    base's KV cache: routing is per token and causal, so cached keys and values (computed from
    earlier tokens' routed MLP outputs) stay valid. Without it the whole sequence re-runs each
    step (the reference the cache is tested against). Positions count real tokens only, so a
    left-padded row decodes as it would alone. Tensors stay on the mixture's device.
    """
    device = mixture.device
    ids_BT = input_ids_BT.to(device)
    mask_BT = torch.ones_like(ids_BT) if attention_mask_BT is None else attention_mask_BT.to(device)
    # Without padding the base's own positions and causal mask are right and cheaper.
    padded = not bool(mask_BT.all())
    step_ids, cache = ids_BT, None
    for _ in range(max_new_tokens):
        positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0) if padded else None
        output, trace = mixture(
            step_ids,
            attention_mask=mask_BT if padded else None,
            position_ids=positions_BT[:, -step_ids.shape[1] :] if padded else None,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=1,
            return_routing=True,
        )
        logits_BV = output.logits[:, -1].float()
        if greedy:
            next_B = logits_BV.argmax(-1)
        else:
            next_B = torch.multinomial(logits_BV.softmax(-1), 1, generator=generator)[:, 0]
        route_B = majority_route([_last_position(r) for r in trace])[:, 0]
        yield DecodeStep(next_B, route_B, logits_BV)
        if padded:
            mask_BT = torch.cat([mask_BT, mask_BT.new_ones(mask_BT.shape[0], 1)], 1)
        if use_cache:
            step_ids, cache = next_B[:, None], output.cache
        else:
            ids_BT = torch.cat([ids_BT, next_B[:, None]], 1)
            step_ids = ids_BT


def _last_position(routing: LayerRouting) -> LayerRouting:
    return LayerRouting(
        routing.layer,
        routing.route_ids_BTK[:, -1:],
        routing.weights_BTK[:, -1:],
        routing.probs_BTR[:, -1:],
    )


def generate_batch_with_routes(
    mixture: MixtureModel,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    greedy: bool = True,
    seed: int = 0,
    use_cache: bool = True,
) -> list[tuple[str, list[tuple[str, str]]]]:
    """Generates continuations of prompts that arrive together, as one left-padded batch;
    per prompt (text, [(token string, route name)] per new token), as
    :func:`generate_with_routes` gives it for that prompt alone. A row ends at its EOS token
    (included) or after ``max_new_tokens``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    token_lists = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    if not all(token_lists):
        raise ValueError("prompts: every prompt must have at least one token")
    width = max(len(ids) for ids in token_lists)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_BT = torch.tensor([[pad] * (width - len(ids)) + ids for ids in token_lists])
    mask_BT = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in token_lists])
    generator = torch.Generator(device=mixture.device).manual_seed(seed)
    new_ids: list[list[int]] = [[] for _ in prompts]
    routes: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    steps = stream_routes(mixture, ids_BT, mask_BT, max_new_tokens, greedy, generator, use_cache)
    for next_B, route_B, _ in steps:
        for row, (token, route) in enumerate(zip(next_B.tolist(), route_B.tolist(), strict=True)):
            if not done[row]:
                new_ids[row].append(token)
                routes[row].append(route)
                done[row] = token == tokenizer.eos_token_id
        if all(done):
            break
    return [
        (
            tokenizer.decode(ids),
            [(tokenizer.decode([t]), mixture.route_name(r)) for t, r in zip(ids, row, strict=True)],
        )
        for ids, row in zip(new_ids, routes, strict=True)
    ]


def generate_with_routes(
    mixture: MixtureModel,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    greedy: bool = True,
    seed: int = 0,
    use_cache: bool = True,
) -> tuple[str, list[tuple[str, str]]]:
    """Generates a continuation; returns (text, [(token string, route name)] per new token).

    A token's route is the majority over layers of its top-1 route at the position that
    predicted it (``"base"`` for the null route). Decoding uses the KV cache
    (:func:`stream_routes`)."""
    return generate_batch_with_routes(
        mixture, tokenizer, [prompt], max_new_tokens, greedy, seed, use_cache
    )[0]


def clone_expert_with_rows(expert: Expert, rows: torch.Tensor) -> Expert:
    """The same expert with other router rows (annealing output), manifest unchanged."""
    twin = copy.copy(expert)
    twin.router = rows.detach().clone()
    return twin


def load_mixture(base_model: nn.Module, folders: Sequence[Path], top_k: int = 2) -> MixtureModel:
    """The routed mixture over the committed expert folders, in the given order, with everything
    routing needs: each expert's adapter and router rows, and the mixture's own router state
    (null route and router center) from the last folder that carries one.

    The last such folder is the most recently composed expert when folders are given oldest
    first (the library's order): router annealing trained that null route with the earlier
    experts in place, and every expert's rows are relative to its router center. Without any,
    the null route and center stay zero. Every mixture built from expert folders (composition,
    benchmarks, ``taas generate``, the marketplace) is built here, so they all route alike.
    """
    return mixture_of(base_model, [load_expert(Path(folder)) for folder in folders], top_k)


def mixture_of(base_model: nn.Module, experts: Sequence[Expert], top_k: int = 2) -> MixtureModel:
    """:func:`load_mixture` over experts already loaded (reading and checking their files can
    then happen apart from this step, which reads the base model's modules)."""
    mixture = MixtureModel.from_experts(base_model, list(experts), top_k=top_k)
    saved = [expert.null_route for expert in experts if expert.null_route is not None]
    if saved:
        mixture.load_null_route(saved[-1])
    return mixture
