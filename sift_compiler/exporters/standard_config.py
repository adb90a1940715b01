"""The config of a plain wider model that holds a Sparse Wide Hugging Face model's weights.

Sparse Wide keeps the architecture and changes sizes, so a widened ``LlamaForCausalLM`` is a
plain ``LlamaForCausalLM`` of a wider config with zeros in its weights. Which config fields hold
the widened sizes is read from the model, not from a table of field names:

1. the dense model's shapes (its class built from its config on the meta device) against the
   compiled model's give a map dense size -> widened sizes;
2. every integer field of the config whose value is a size that changed is a candidate, with
   the sizes it may take; so are fields left unset whose name says they hold a size (GPT-2's
   ``n_inner``, derived as 4 x ``n_embd``), and ``head_dim`` where the config derives it from
   ``hidden_size`` (a widened residual stream with the attention width kept needs it written);
3. the assignment changing fewest fields whose plain model has exactly the compiled model's state-dict keys and
   shapes is the config; `checkpoints` then checks that it computes the same outputs.

A rewrite no config can describe (Parallel, Factorized, Doped blocks; a width no field holds)
gets a `StandardCheckpointRefused` with the reason.
"""
from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn

from ..errors import UserInputError
from ..module_tools import submodule_or_none

SIZE_HINTS = ("inner", "intermediate", "ffn", "dim", "size")  # unset fields that may hold a width
MAX_ASSIGNMENTS = 512  # assignments of candidate fields tried (each builds a model on the meta device)


class StandardCheckpointRefused(UserInputError):
    """The compiled model cannot be written as a plain checkpoint of its class; the message says why."""


def is_hugging_face(module: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (it has a config and save_pretrained)."""
    return hasattr(getattr(module, "config", None), "to_dict") and hasattr(module, "save_pretrained")


def dense_config(module: nn.Module) -> Any:
    """The config the model was compiled from, without sift's plan."""
    config = copy.deepcopy(module.config)
    config.__dict__.pop("sift", None)
    return config


def meta_model(cls: type, config: Any) -> nn.Module:
    """``cls(config)`` on the meta device: structure and shapes, no memory, no init."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(config)


def meta_shapes(cls: type, config: Any) -> Dict[str, Tuple[int, ...]]:
    """State-dict shapes of ``cls(config)``, built on the meta device (no memory, no init)."""
    return {k: tuple(v.shape) for k, v in meta_model(cls, config).state_dict().items()}


def transposed_weights(plain: nn.Module, compiled: nn.Module) -> Set[str]:
    """Weights the plain model stores (in, out) where the compiled model holds a Linear (out, in):
    transformers' ``Conv1D`` (GPT-2), which capture turned into a Linear that a rewrite kept."""
    found = set()
    for path, module in plain.named_modules():
        if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor):
            if isinstance(submodule_or_none(compiled, path), nn.Linear):
                found.add(f"{path}.weight" if path else "weight")
    return found


def plain_layout(state: Dict[str, torch.Tensor], transposed: Set[str]) -> Dict[str, torch.Tensor]:
    """``state`` with the `transposed_weights` in the plain model's (in, out) layout."""
    return {k: (v.t().contiguous() if k in transposed else v) for k, v in state.items()}


def _size_map(dense: Dict[str, Tuple[int, ...]], wide: Dict[str, Tuple[int, ...]]) -> Dict[int, Set[int]]:
    """dense size -> the sizes that axis has in the compiled model, over tensors both have."""
    sizes: Dict[int, Set[int]] = {}
    for key, shape in dense.items():
        new = wide.get(key)
        if new is not None and len(new) == len(shape):
            for a, b in zip(shape, new):
                sizes.setdefault(a, set()).add(b)
    return sizes


def _candidates(config: Any, sizes: Dict[int, Set[int]]) -> List[Tuple[str, List[Optional[int]]]]:
    """(field, values to try) for the config fields that may hold a widened size."""
    fields = []
    values = config.to_dict()
    for name, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool) and sizes.get(value, {value}) != {value}:
            fields.append((name, sorted(sizes[value] - {value}) + [value]))
    # a size left unset derives from others (GPT-2's n_inner = 4 n_embd); Sparse Wide may have made
    # it something the derivation does not give, so it may have to be written
    widened = sorted({b for a, bs in sizes.items() for b in bs if b != a})
    for name, value in values.items():
        if value is None and name != "head_dim" and any(hint in name for hint in SIZE_HINTS):
            fields.append((name, [None] + widened))
    heads, hidden = values.get("num_attention_heads"), values.get("hidden_size")
    if values.get("head_dim") is None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        head_dim = hidden // heads  # what the model derives now; a wider hidden_size would change it
        fields.append(("head_dim", [None, head_dim] + sorted(sizes.get(head_dim, set()) - {head_dim})))
    return fields


def _with(config: Any, assignment: Dict[str, Optional[int]]) -> Any:
    new = copy.deepcopy(config)
    for name, value in assignment.items():
        if value is not None:
            setattr(new, name, value)
    return new


def _mismatch(expected: Dict[str, Tuple[int, ...]], actual: Dict[str, Tuple[int, ...]]) -> List[str]:
    """What differs between the plain model's shapes (expected) and the compiled model's."""
    found = [f"{k}: sift has {list(actual[k])}, the config gives {list(v)}"
             for k, v in expected.items() if k in actual and actual[k] != v]
    found += [f"{k} is not in the plain model" for k in actual if k not in expected]
    found += [f"the plain model has {k}, sift does not" for k in expected if k not in actual]
    return found


def standard_configs(cls: type, config: Any, compiled: nn.Module, state: Dict[str, torch.Tensor]):
    """Yield (config, {field: (old, new)}, the state in the plain layout) for each config whose
    plain ``cls`` has exactly the shapes of ``state`` (the compiled model's, masks baked in);
    raise `StandardCheckpointRefused` naming the nearest miss when none does."""
    dense_model = meta_model(cls, config)
    state = plain_layout(state, transposed_weights(dense_model, compiled))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    dense = {k: tuple(v.shape) for k, v in dense_model.state_dict().items()}
    fields = _candidates(config, _size_map(dense, shapes))
    names = [name for name, _ in fields]
    best: Optional[List[str]] = None
    found = False
    old = config.to_dict()
    assignments = [dict(zip(names, values)) for values in
                   itertools.islice(itertools.product(*(v for _, v in fields)), MAX_ASSIGNMENTS)]
    # fewest fields changed first: a field that only happens to equal a widened size stays as it was
    assignments.sort(key=lambda a: sum(v is not None and v != old.get(k) for k, v in a.items()))
    for assignment in assignments:
        candidate = _with(config, assignment)
        try:
            plain = meta_shapes(cls, candidate)
        except Exception:  # the config refuses these sizes (e.g. not divisible by the heads)
            continue
        missed = _mismatch(plain, shapes)
        if not missed:
            found = True
            yield candidate, {k: (old.get(k), v) for k, v in assignment.items() if v is not None and old.get(k) != v}, \
                state
        elif best is None or len(missed) < len(best):
            best = missed
    if not found:
        why = best[0] + (f" (and {len(best) - 1} more)" if len(best) > 1 else "") if best else "no field holds a size"
        raise StandardCheckpointRefused(
            f"no {cls.__name__} config has the compiled model's shapes (a width no config field holds): {why}")
