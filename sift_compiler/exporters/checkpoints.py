"""Checkpoint folders of a compiled model: standard (plain transformers), compact, or sift's own.

============  ===================================================================  =====================
format        what the folder holds                                                loads with
============  ===================================================================  =====================
standard      config.json of a *wider model of the same class* (Sparse Wide's       ``from_pretrained``
              sizes), the weights with their zeros baked in (model.safetensors,    (no sift) and
              sharded like transformers), plus sift_plan.json and the masks        ``sift.load``
              packed 1 bit each (sift_masks.safetensors)
compact       sift_plan.json + sift_compact.safetensors: masked weights as their   ``sift.load``
              kept values and a packed bitmask (`compact`); any transform, any
              model, unstructured or N:M masks; about a tenth of the dense file
              at s = 0.9
sift          the model's own ``save_pretrained`` (Hugging Face models only):      ``sift.load``
              config.json with the plan in it, weights and bool masks
============  ===================================================================  =====================

``format="auto"`` writes ``standard`` where it can, and otherwise (Parallel, Factorized or Doped
blocks, a width no config field holds, the graph form) the sift format with a `SiftWarning`
giving the reason (``strict`` in the compile options makes it an error); ``format="standard"``
refuses with `StandardCheckpointRefused` instead. Before a standard folder is written, the plain
model built from its config is run against the compiled model on the example inputs (1e-5).

Files appear whole or not at all: the folder is written beside the target and its files are
moved in, replacing what a previous save of any format left there.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..compare import tensor_leaves
from ..errors import ModelLoadError, SiftWarning, UserInputError, first_line
from ..module_tools import eval_mode
from ..native import relative_error
from ..plan import FORMAT, plan_config, plan_inputs, plan_of
from ..sparsity.layers import MaskedLayer
from .dynamic_shapes import other_shape_inputs
from .compact import _masked_pairs, compress_state, decompress_state, pack_bits, state_nbytes, unpack_bits
from .standard_config import (StandardCheckpointRefused, dense_config, is_hugging_face, meta_model, standard_configs,
                              transposed_weights)

FORMATS = ("auto", "standard", "compact", "sift")
PLAN_FILE = "sift_plan.json"
MASKS_FILE = "sift_masks.safetensors"
COMPACT_FILE = "sift_compact.safetensors"
STANDARD_RTOL = 1e-5
SHAPE_CHECKS = 4  # configs with the right shapes whose outputs are compared before refusing


def save_pretrained(result: Any, directory: str, format: str = "auto", max_shard_size: str = "5GB") -> str:
    """Write ``result`` (a `CompileResult`, or a compiled Hugging Face model on its own, e.g. after
    training) as a checkpoint folder; returns the format written.

    >>> sift.save_pretrained(result, "llama-wide")                  # standard where it can be
    >>> AutoModelForCausalLM.from_pretrained("llama-wide")          # no sift needed
    >>> sift.load("llama-wide")                                     # masks back, for training
    >>> sift.save_pretrained(result, "small", format="compact")     # values + bitmask
    """
    if isinstance(result, nn.Module):
        result = _SavedModule.of(result)
    if format not in FORMATS:
        raise UserInputError(f"checkpoint format must be one of {', '.join(FORMATS)}, got {format!r}")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserInputError(f"checkpoint folder {directory!r} is a file")
    module = result.module
    if format in ("auto", "standard"):
        try:
            config, changed, state = standard_config(result)
        except StandardCheckpointRefused as e:
            hugging_face = is_hugging_face(module)
            if format == "standard" or (hugging_face and result.config.strict):
                raise
            if hugging_face:  # another model never has a standard form: nothing to warn about
                warnings.warn(f"standard checkpoint refused, wrote the sift format: {e}", SiftWarning, stacklevel=2)
            format = "sift" if hugging_face else "compact"
        else:
            with _folder(directory) as tmp:
                _write_standard(result, config, changed, state, tmp, max_shard_size)
            return "standard"
    with _folder(directory) as tmp:
        if format == "compact":
            _write_compact(result, tmp)
        else:
            if not is_hugging_face(module):
                raise UserInputError(f"format='sift' is a Hugging Face model's save_pretrained folder; "
                                     f"{type(module).__name__} is not one: use format='compact' or result.save(path)")
            module.save_pretrained(tmp, max_shard_size=max_shard_size)
    return format


@dataclass
class _SavedModule:
    """What saving needs of a `CompileResult`, for a compiled Hugging Face model given alone (after
    training, ``trainer.model``): its plan is in ``config.sift``."""

    module: nn.Module
    plan: Dict[str, Any]
    config: Any
    unit: Any
    output: str = "native"

    @staticmethod
    def of(module: nn.Module) -> "_SavedModule":
        plan = getattr(getattr(module, "config", None), "sift", None)
        if not isinstance(plan, dict) or plan.get("format") != FORMAT:
            raise UserInputError(f"{type(module).__name__} carries no sift plan (config.sift): pass the CompileResult "
                                 "that sift.compile or sift.load returned")
        args, kwargs = plan_inputs(plan, module)
        return _SavedModule(module, plan, plan_config(plan), SimpleNamespace(args=args, kwargs=kwargs))


def standard_config(result) -> Tuple[Any, Dict[str, Tuple[Any, Any]], Dict[str, torch.Tensor]]:
    """(the wider plain model's config, {field: (dense value, written value)}, its state dict),
    checked to compute what ``result.module`` computes; or `StandardCheckpointRefused` with the reason."""
    module = result.module
    name = type(module).__name__
    if result.output != "native":
        raise StandardCheckpointRefused("the result is the graph form, not the model's own class: only that can be "
                                        "written as a plain checkpoint (result.report.notes say why it is not)")
    if not is_hugging_face(module):
        raise StandardCheckpointRefused(f"{name} is not a Hugging Face model: a standard checkpoint is a "
                                        "transformers folder (use format='compact', or result.save(path))")
    if result.config.transform not in ("wide", "none"):
        raise StandardCheckpointRefused(
            f"transform {result.config.transform!r} replaces layers with blocks ({_blocks(module)}) that no "
            f"{name} config describes; only Sparse Wide keeps the architecture: use format='sift' or 'compact'")
    cls = type(module)
    misses = []
    for checked, (config, changed, state) in enumerate(standard_configs(cls, dense_config(module), module,
                                                                        baked_state(module))):
        if checked == SHAPE_CHECKS:
            break
        why = _compare(result, cls, config, state)
        if why is None:
            return config, changed, state
        misses.append(why)
    raise StandardCheckpointRefused(f"the plain {name} of the widened config computes something else than the "
                                    f"compiled model: {misses[0]} (a size the config cannot express)")


def _blocks(module: nn.Module) -> str:
    kinds = sorted({type(m).__name__ for m in module.modules()
                    if type(m).__module__.startswith("sift_compiler") and not isinstance(m, MaskedLayer)})
    return ", ".join(kinds[:3]) or "sift modules"


def baked_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict without masks, each masked weight as ``where(mask, W, 0)``."""
    state = module.state_dict()
    pairs = _masked_pairs(state)
    masks = set(pairs.values())
    baked = {}
    for key, tensor in state.items():
        if key in masks:
            continue
        tensor = tensor.detach()
        baked[key] = torch.where(state[pairs[key]], tensor, torch.zeros((), dtype=tensor.dtype)) \
            if key in pairs else tensor
    return baked


def _compare(result, cls: type, config: Any, state: Dict[str, torch.Tensor]) -> Optional[str]:
    """None when ``cls(config)`` holding ``state`` computes what the compiled model computes, on
    the example inputs and at a second size (a wrong head_dim or RoPE width shows at any size)."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        plain = cls(config)
    weight = next(iter(result.module.parameters()), None)
    if weight is not None:  # where and in what precision the compiled model computes
        plain.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError as e:
        return first_line(e)
    inputs = (result.unit.args, result.unit.kwargs)
    for label, (args, kwargs) in (("the example inputs", inputs), ("a second input size", other_shape_inputs(inputs))):
        error = relative_error(_outputs(plain, args, kwargs), _outputs(result.module, args, kwargs))
        if not error <= STANDARD_RTOL:
            return f"relative error {error:.3g} on {label}"
    return None


def _outputs(module: nn.Module, args, kwargs):
    """The output tensors in eval mode, with the module's own forward (``W * M`` for masked layers)."""
    with torch.no_grad(), eval_mode(module):
        return tensor_leaves(module(*args, **kwargs))


def _plan(result, checkpoint: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    plan = copy.deepcopy(result.plan) if isinstance(result, _SavedModule) else plan_of(result)
    plan["checkpoint"] = checkpoint
    if is_hugging_face(result.module):  # the dense model to rebuild, whatever the source was
        plan["dense_config"] = dense_config(result.module).to_dict()
        plan["model_class"] = type(result.module).__name__
    plan.update(extra or {})
    return plan


def _write_standard(result, config: Any, changed: Dict[str, Tuple[Any, Any]], state: Dict[str, torch.Tensor],
                    tmp: str, max_shard_size: str) -> None:
    from huggingface_hub import save_torch_state_dict  # optional (the [transformers] extra)
    module = result.module
    config.architectures = [type(module).__name__]
    config.save_pretrained(tmp)
    generation = getattr(module, "generation_config", None)
    if generation is not None and getattr(module, "can_generate", lambda: False)():
        generation.save_pretrained(tmp)
    save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
    full = module.state_dict()
    masks = {k: full[k] for k in _masked_pairs(full).values()}  # 1 bit each, in sift's layout
    shapes = {k: list(v.shape) for k, v in masks.items()}
    _save_safetensors({k: pack_bits(v) for k, v in masks.items()}, os.path.join(tmp, MASKS_FILE),
                      {"sift_mask_shapes": json.dumps(shapes)})
    widths = {k: list(v) for k, v in changed.items()}
    transposed = sorted(transposed_weights(meta_model(type(module), config), module))
    _write_json(os.path.join(tmp, PLAN_FILE), _plan(result, "standard", {"standard_widths": widths,
                                                                         "standard_transposed": transposed}))


def _write_compact(result, tmp: str) -> None:
    tensors, metadata = compress_state(result.module.state_dict())
    _save_safetensors(tensors, os.path.join(tmp, COMPACT_FILE), metadata)
    _write_json(os.path.join(tmp, PLAN_FILE), _plan(result, "compact", {"compact_bytes": state_nbytes(tensors)}))


def read_checkpoint_state(directory: str, plan: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The compiled model's state dict (weights and masks) from a standard or compact folder."""
    from safetensors import safe_open  # optional (the [transformers] extra)
    from safetensors.torch import load_file
    checkpoint = plan.get("checkpoint")

    def read(name: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ModelLoadError(f"{directory!r}: a {checkpoint} checkpoint without {name}")
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata

    if checkpoint == "compact":
        return decompress_state(*read(COMPACT_FILE))
    if checkpoint != "standard":
        raise ModelLoadError(f"{directory!r}: unknown checkpoint kind {checkpoint!r} in {PLAN_FILE}")
    state: Dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("model") and name.endswith(".safetensors"):
            state.update(load_file(os.path.join(directory, name)))
    packed, metadata = read(MASKS_FILE)
    shapes = json.loads(metadata.get("sift_mask_shapes", "{}"))
    for key, bits in packed.items():
        state[key] = unpack_bits(bits, tuple(shapes[key]))
    for key in plan.get("standard_transposed", ()):  # GPT-2's Conv1D layout back to sift's Linear
        state[key] = state[key].t().contiguous()
    return state


def _save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file  # optional (the [transformers] extra)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def _write_json(path: str, data: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


_WRITTEN_HERE = ("config.json", "generation_config.json", PLAN_FILE, MASKS_FILE, COMPACT_FILE)


def _stale(name: str) -> bool:
    """A file a save of any format writes (left by an earlier save: replaced or removed)."""
    return name in _WRITTEN_HERE or (name.startswith("model") and (name.endswith(".safetensors")
                                                                   or name.endswith(".safetensors.index.json")))


@contextlib.contextmanager
def _folder(directory: str):
    """A temporary folder beside ``directory``; its files replace the checkpoint files there on success."""
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):
        raise UserInputError(f"cannot write checkpoint {directory!r}: directory {parent!r} does not exist")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(directory))}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        if not os.path.isdir(directory):
            os.chmod(tmp, 0o777 & ~_umask())
            os.replace(tmp, directory)
            return
        for name in os.listdir(directory):
            if _stale(name) and not os.path.exists(os.path.join(tmp, name)):
                os.remove(os.path.join(directory, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
