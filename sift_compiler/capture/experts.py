"""Mixture-of-experts layers as one weight layer per expert.

transformers 5.x stores the experts of a MoE block (Mixtral, Qwen2/3-MoE, DeepSeek-V2/3, OLMoE...)
as fused 3-D parameters, ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], applied by a
per-expert loop, batched matmuls or grouped matmuls over index gathers: no `nn.Linear` a pass
could mask, widen or split. Capture rewrites such a module into `RoutedExperts`, which holds each
expert as an ordinary gated MLP (``gate_proj``, ``up_proj``, ``down_proj`` Linears) and keeps the
fused module's call signature ``(hidden_states, top_k_index, top_k_weights)``. Each expert's
Linears are then weight layers of their own: own mask, own exact count, own RigL top-k, and every
transform rewrites each expert.

Two ways to run the same function:

- eagerly (training, ``generate()``), each expert runs on the tokens routed to it, as the fused
  module's loop does;
- under a graph capture (torch.fx, torch.export, TorchScript/ONNX), a graph cannot hold a
  data-dependent token count, so every expert runs on every token and its output is weighted by
  its routing weight, which is 0 for the experts a token was not routed to. The sum is the same.

A token visits ``top_k`` of the ``num_experts`` experts, so each expert's layers cost
``active_fraction = top_k / num_experts`` of their per-token FLOPs in the graph's accounting
(`analyses.flops`): iso-FLOP for a MoE means equal FLOPs per token counting active experts.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn

from ..module_tools import submodule_or_none

__all__ = ["ExpertMLP", "RoutedExperts", "experts_refusal", "annotate_routing", "is_fused_experts",
           "to_routed_experts", "EXPERTS_KEPT_FUSED", "ROUTED"]


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _tracing() -> bool:
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch.fx._symbolic_trace.is_fx_symbolic_tracing())


class RoutedExperts(nn.Module):
    """The experts of a MoE block as ``num_experts`` `ExpertMLP` modules (see the module docstring).

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``, the
    fused experts' signature, so the MoE block, its router and its load-balancing loss are unchanged.
    """

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, act_fn: nn.Module,
                 bias: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_dim, self.intermediate_dim = hidden, intermediate
        self.experts = nn.ModuleList(ExpertMLP(hidden, intermediate, act_fn, bias) for _ in range(num_experts))

    @property
    def active_fraction(self) -> float:
        """The share of tokens each expert sees on average: top_k of num_experts."""
        return self.top_k / self.num_experts

    @classmethod
    def from_fused(cls, fused: nn.Module, top_k: int) -> "RoutedExperts":
        """The same experts, one `ExpertMLP` each, holding copies of the fused weights."""
        gate_up, down = fused.gate_up_proj, fused.down_proj
        num_experts, hidden, intermediate = down.shape
        bias = bool(getattr(fused, "has_bias", False))
        with torch.device("meta"):  # no initialisation: every value is copied below
            new = cls(num_experts, top_k, hidden, intermediate, fused.act_fn, bias)
        new = new.to(dtype=down.dtype).to_empty(device=down.device)
        with torch.no_grad():
            for e, expert in enumerate(new.experts):
                expert.gate_proj.weight.copy_(gate_up[e, :intermediate])
                expert.up_proj.weight.copy_(gate_up[e, intermediate:])
                expert.down_proj.weight.copy_(down[e])
                if bias:
                    expert.gate_proj.bias.copy_(fused.gate_up_proj_bias[e, :intermediate])
                    expert.up_proj.bias.copy_(fused.gate_up_proj_bias[e, intermediate:])
                    expert.down_proj.bias.copy_(fused.down_proj_bias[e])
        new.train(fused.training)
        return new

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if _tracing():
            return self._dense_dispatch(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            routed = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, routed.to(out.dtype))
        return out

    def _dense_dispatch(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            # the routing weight of expert e for each token: 0 where the token was not routed to e
            weight = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)
            out = out + (expert(hidden_states) * weight).to(out.dtype)
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5.x fused-experts module: 3-D ``gate_up_proj``/``down_proj`` parameters."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3 and not isinstance(module, RoutedExperts))


def _default_gate(module: nn.Module) -> bool:
    apply_gate = getattr(type(module), "_apply_gate", None)
    return apply_gate is not None and apply_gate.__name__ == "_default_apply_gate"


def experts_refusal(module: nn.Module, path: str) -> Optional[str]:
    """Why ``module`` (fused experts at ``path``) cannot become `RoutedExperts`, or None."""
    where = f"{path} ({type(module).__name__}, {_source(module)})"
    num_experts, hidden, intermediate = module.down_proj.shape
    if tuple(module.gate_up_proj.shape) != (num_experts, 2 * intermediate, hidden):
        return (f"{where}: gate_up_proj {tuple(module.gate_up_proj.shape)} is not [E, 2I, H] "
                f"for down_proj {tuple(module.down_proj.shape)} (transposed or unfused layout)")
    flags = {"is_transposed": False, "is_concatenated": True, "has_gate": True, "has_post_expert_norm": False}
    for flag, wanted in flags.items():
        if getattr(module, flag, wanted) != wanted:
            return f"{where}: {flag}={not wanted} is not supported (only concatenated [gate; up] experts)"
    if not _default_gate(module):
        return f"{where}: a custom gate activation ({type(module).__name__}._apply_gate) is not supported"
    if not isinstance(getattr(module, "act_fn", None), nn.Module):
        return f"{where}: no act_fn module"
    if _top_k(module) is None:
        return f"{where}: its config gives no num_experts_per_tok (top-k)"
    return None


def _top_k(module: nn.Module) -> Optional[int]:
    config = getattr(module, "config", None)
    for name in ("num_experts_per_tok", "moe_topk", "top_k"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _source(module: nn.Module) -> str:
    try:
        return f"{inspect.getsourcefile(type(module))}:{inspect.getsourcelines(type(module))[1]}"
    except (OSError, TypeError):
        return type(module).__module__


def to_routed_experts(module: nn.Module) -> RoutedExperts:
    """`RoutedExperts` computing what the fused ``module`` computes (check `experts_refusal` first)."""
    return RoutedExperts.from_fused(module, _top_k(module))


# the note capture writes for fused experts it cannot rewrite (`shortfall` reports it)
EXPERTS_KEPT_FUSED = ("mixture-of-experts experts kept fused (dense, and not weight layers: their FLOPs are "
                      "outside the iso-FLOP count)")
ROUTED = "sift.routed"  # node meta: the share of tokens the node computes on (`active_fraction`)


def annotate_routing(gm: torch.fx.GraphModule, model: nn.Module) -> int:
    """Mark the nodes computed inside a `RoutedExperts` of ``model`` with its ``active_fraction``
    (``node.meta["sift.routed"]``), which `analyses.flops` counts them at."""
    marked = 0
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            module = submodule_or_none(model, path)
            if isinstance(module, RoutedExperts):
                node.meta[ROUTED] = module.active_fraction
                marked += 1
                break
    return marked

