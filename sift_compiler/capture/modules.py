"""Module-level canonicalisation, done on a copy of the user's model before tracing.

Library modules hide dense matmuls from a graph capture, so they are rewritten into plain
`nn.Linear` layers that compute exactly the same function:

1. ``transformers.pytorch_utils.Conv1D(nf, nx)`` (GPT-2's projections): ``x @ W + b`` with W of
   shape (nx, nf) -> ``nn.Linear(nx, nf)`` with the weight transposed.
2. ``nn.MultiheadAttention`` (torchvision's ViT): one packed ``in_proj_weight`` and a fused
   kernel -> `ExplicitMultiheadAttention` with ``q_proj``/``k_proj``/``v_proj``/``out_proj``
   Linears and ``scaled_dot_product_attention``.
3. transformers 5.x fused mixture-of-experts experts (``gate_up_proj`` [E, 2I, H], ``down_proj``
   [E, H, I]) -> `experts.RoutedExperts`, one gated MLP of Linears per expert; layouts it cannot
   rewrite stay fused and are reported (``refusals``).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .experts import experts_refusal, is_fused_experts, to_routed_experts

log = logging.getLogger(__name__)


class ExplicitMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` with its projections as separate `nn.Linear` layers.

    Same call signature and outputs as `nn.MultiheadAttention` for the configurations it is built
    from (no ``add_bias_kv``, no ``add_zero_attn``, ``kdim == vdim == embed_dim``).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, batch_first: bool,
                 bias: bool, inner_dim: Optional[int] = None) -> None:
        super().__init__()
        inner_dim = inner_dim or embed_dim
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = inner_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, inner_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner_dim, bias=bias)
        self.out_proj = nn.Linear(inner_dim, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "ExplicitMultiheadAttention":
        with torch.device("meta"):  # no initialisation: every value is copied below (and no RNG is drawn)
            new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.batch_first, mha.in_proj_bias is not None)
        new = new.to(dtype=mha.out_proj.weight.dtype).to_empty(device=mha.out_proj.weight.device)
        d = mha.embed_dim
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                if mha.in_proj_bias is not None:
                    proj.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, seq, inner) -> (batch, heads, seq, head_dim)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            if is_causal and mask is None:
                length = scores.shape[-1]
                causal = torch.ones(scores.shape[-2], length, dtype=torch.bool, device=scores.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            weights = F.dropout(scores.softmax(-1), dropout, self.training)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).flatten(-2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def is_transformers_model(model: nn.Module) -> bool:
    """A Hugging Face `PreTrainedModel` (checked by name: transformers need not be installed)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)



def on_meta_device(module: nn.Module) -> bool:
    """Does ``module`` hold any parameter or buffer on the meta device?"""
    return any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def _merge_masks(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                 dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Additive float mask broadcastable to (batch, heads, q_len, k_len), or None."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
        return mask.to(dtype)
    merged = None
    if attn_mask is not None:
        merged = additive(attn_mask)
        if merged.dim() == 3:  # (batch * heads, q, k) -> (batch, heads, q, k) is model-specific
            merged = merged.unsqueeze(0) if merged.shape[0] == 1 else merged
    if key_padding_mask is not None:
        padding = additive(key_padding_mask)[:, None, None, :]
        merged = padding if merged is None else merged + padding
    return merged


def _conv1d_to_linear(conv1d: nn.Module) -> nn.Linear:
    nx, nf = conv1d.weight.shape
    # built on the meta device: no initialisation (every value is copied below, no RNG is drawn)
    linear = nn.Linear(nx, nf, bias=conv1d.bias is not None, device="meta",
                       dtype=conv1d.weight.dtype).to_empty(device=conv1d.weight.device)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        if conv1d.bias is not None:
            linear.bias.copy_(conv1d.bias)
    return linear


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _mha_is_convertible(mha: nn.MultiheadAttention) -> bool:
    return mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn


def canonicalize_modules(model: nn.Module, refusals: Optional[List[str]] = None) -> Dict[str, nn.Module]:
    """Rewrite, in place, the library modules that hide matmuls.

    Returns ``{path: original module}`` for every path rewritten (a module shared by several
    paths stays shared and is listed under each), so that the native model can put back the
    library modules that no transform replaced (`native.restore_library_modules`). Fused MoE
    experts in a layout `experts.RoutedExperts` cannot hold stay as they are; why (module, source
    line) is appended to ``refusals``.
    """
    replaced = {}  # id(old module) -> new module, so a shared module stays shared
    originals: Dict[str, nn.Module] = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            replacement = replaced.get(id(child))
            if replacement is not None:
                pass
            elif _is_hf_conv1d(child):
                replacement = _conv1d_to_linear(child)
            elif is_fused_experts(child):
                path = f"{parent_name}.{child_name}".lstrip(".")
                refusal = experts_refusal(child, path)
                if refusal is None:
                    replacement = to_routed_experts(child)
                elif refusals is not None:
                    refusals.append(refusal)
            elif isinstance(child, nn.MultiheadAttention):
                if _mha_is_convertible(child):
                    replacement = ExplicitMultiheadAttention.from_torch(child)
                else:
                    log.warning("%s: nn.MultiheadAttention with bias_kv/zero_attn/kdim kept as an opaque "
                                "module; its projections stay dense", f"{parent_name}.{child_name}".lstrip("."))
            if replacement is not None:
                replaced[id(child)] = replacement
                originals[f"{parent_name}.{child_name}".lstrip(".")] = child
                setattr(parent, child_name, replacement)
    return originals
