"""Saving and loading compiled models without executing code from the file.

Format (``sift-compiler/1``): one ``torch.save`` file holding only plain data, readable with
``torch.load(path, weights_only=True)``::

    {"format": "sift-compiler/1",
     "plan": {"source": {"spec": "torchvision:resnet18", ...} or None,
              "config": {...CompileConfig...}, "inputs": {"args": [[shape, dtype]...], "kwargs": {...}},
              "versions": {"sift_compiler": ..., "torch": ...}},
     "state_dict": {name: tensor}}          # weights, BatchNorm statistics and masks

``load`` rebuilds the dense model from the plan's source (library models by name; a
``package.module:callable`` only with ``trust_source=True``; or the ``model=`` you pass),
re-runs the same deterministic compilation, and loads the state dict (strict).

A Hugging Face model compiled to its native form carries the same plan in ``config.sift``, so
its own ``save_pretrained(dir)`` writes a directory (config.json + safetensors with weights and
masks) that ``load(dir)`` brings back the same way.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from .capture.sources import FAMILIES, load_model
from .config import CompileOptions
from .errors import ModelLoadError, first_line
from .exporters.checkpoints import read_checkpoint_state
from .io import atomic_path, check_writable, load_weights_only
from .plan import FORMAT, plan_config, plan_inputs, plan_of  # noqa: F401 (re-exported)
from .report import current_report

CHECKPOINT_PLAN = "sift_plan.json"  # a standard or compact folder (`exporters.checkpoints`)


def attach_plan(result) -> None:
    """A Hugging Face model carries its plan in ``config.sift``: ``save_pretrained`` writes it to
    config.json, which is how `load` (given the directory) compiles the same model again."""
    config = getattr(result.module, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(result.module, "save_pretrained"):
        config.sift = plan_of(result)


def save(result, path: str) -> None:
    """Write ``result`` (a `CompileResult`) to ``path`` in the format above, atomically."""
    check_writable(path, "model file")
    plan = plan_of(result)
    state = {k: v.detach().cpu().clone() for k, v in result.module.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "plan": plan, "state_dict": state}, tmp)


def read(path: str) -> Dict[str, Any]:
    """The saved dict, read without executing code (weights_only)."""
    content = load_weights_only(path, "compiled model file {path!r} does not exist",
                                "{path!r} is not a sift-compiler model file: {reason}")
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ModelLoadError(f"{path!r} is not a sift-compiler model file (format {FORMAT})")
    return content


def _rebuild_source(source: Optional[Dict[str, Any]], trust_source: bool) -> nn.Module:
    if not source or not source.get("spec"):
        raise ModelLoadError("the file does not say how to rebuild the dense model: pass it as "
                             "sift_compiler.load(path, model=dense_model)")
    spec = source["spec"]
    family = spec.split(":", 1)[0]
    if family not in FAMILIES and not trust_source:
        raise ModelLoadError(f"rebuilding the dense model from {spec!r} would import and run that code; pass "
                             "trust_source=True if you trust it, or model=dense_model")
    return load_model(spec, trust_pickle=trust_source).module


def _compile_from_plan(plan: Dict[str, Any], dense: nn.Module, compile_config: Callable[..., Any]):
    args, kwargs = plan_inputs(plan, dense)
    options = CompileOptions(capture_method=plan.get("capture_method", "auto"), source=plan.get("source"),
                             output=plan.get("output", "graph"))
    return compile_config(dense, plan_config(plan), args, kwargs, options)


def _install_state(result, state: Dict[str, torch.Tensor], path: str, allow_tied: bool = False) -> None:
    """Load ``state`` strictly (``allow_tied``: a key left out by ``save_pretrained`` because its
    tensor is tied to one that is there may be missing); then refresh the report."""
    try:
        missing, unexpected = result.module.load_state_dict(state, strict=not allow_tied)
    except RuntimeError as e:
        raise ModelLoadError(f"{path!r} does not match the rebuilt model: {first_line(e)}") from None
    if allow_tied:
        tensors = {name: t for name, t in list(result.module.named_parameters(remove_duplicate=False))
                   + list(result.module.named_buffers(remove_duplicate=False))}
        present = {id(tensors[k]) for k in state if k in tensors}
        untied = [k for k in missing if id(tensors.get(k)) not in present]
        if untied or unexpected:
            raise ModelLoadError(f"{path!r} does not match the rebuilt model: missing {untied[:5]}, "
                                 f"unexpected {list(unexpected)[:5]}")
    result.unit.touch()
    result.report = current_report(result.unit, result.report.model, result.capture_method)


def load(path: str, model: Optional[nn.Module] = None, trust_source: bool = False, *,
         compile_with: Callable[..., Any]):
    """Load a compiled model: a file written by `save` (``result.save``, ``sift-compile -o``) or a
    directory written by a Hugging Face model's ``save_pretrained``. Returns a `CompileResult`
    whose ``.module`` is trainable, in the form it was saved in (native or graph).

    >>> result = sift_compiler.load("model.sift.pt")        # or sift_compiler.load("checkpoint-500/")
    >>> sift_compiler.sparsity.masks(result.module)

    No code from the files runs: tensors are read with ``torch.load(weights_only=True)`` or
    safetensors, the plan is JSON, and the dense model is rebuilt from its named source (library
    models by name, a Hugging Face config by its class in transformers) or passed as ``model=``.
    ``compile_with``: `api.compile_config` (what `sift_compiler.load` passes; serialize sits below the API).
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, CHECKPOINT_PLAN)):
            return _load_checkpoint(path, model, trust_source, compile_with)
        return _load_pretrained(path, model, compile_with)
    content = read(path)
    plan = content["plan"]
    dense = model if model is not None else _rebuild_source(plan.get("source"), trust_source)
    result = _compile_from_plan(plan, dense, compile_with)
    _install_state(result, content["state_dict"], path)
    return result


def _load_pretrained(directory: str, model: Optional[nn.Module], compile_with: Callable[..., Any]):
    """A Hugging Face ``save_pretrained`` directory of a compiled model (its config.json holds the plan)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ModelLoadError(f"{directory!r} is a directory without config.json: not a save_pretrained directory")
    with open(config_path) as f:
        plan = json.load(f).get("sift")
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise ModelLoadError(f"{config_path!r} has no sift plan: the model was not compiled by sift-compiler "
                             "(load it with transformers' from_pretrained)")
    dense = model if model is not None else _dense_from_pretrained_config(directory)
    result = _compile_from_plan(plan, dense, compile_with)
    state = _checkpoint_names_to_model(_read_safetensors(directory), result.module)
    _install_state(result, state, directory, allow_tied=True)
    return result


def _load_checkpoint(directory: str, model: Optional[nn.Module], trust_source: bool,
                     compile_with: Callable[..., Any]):
    """A standard or compact folder written by `exporters.checkpoints.save_pretrained`."""
    with open(os.path.join(directory, CHECKPOINT_PLAN)) as f:
        plan = json.load(f)
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise ModelLoadError(f"{directory!r}: {CHECKPOINT_PLAN} is not a sift-compiler plan (format {FORMAT})")
    if model is not None:
        dense = model
    elif plan.get("dense_config"):
        dense = _dense_from_config_dict(plan["dense_config"], plan.get("model_class"), directory)
    else:
        dense = _rebuild_source(plan.get("source"), trust_source)
    result = _compile_from_plan(plan, dense, compile_with)
    _install_state(result, read_checkpoint_state(directory, plan), directory, allow_tied=True)
    return result


def _dense_from_config_dict(config: Dict[str, Any], class_name: Optional[str], directory: str) -> nn.Module:
    """The dense Hugging Face model a plan describes: its config class and model class from transformers."""
    try:
        import transformers  # optional (the [transformers] extra), and slow to import
    except ImportError:
        raise ModelLoadError("transformers is not installed: pip install 'sift-compiler[transformers]'") from None
    try:
        config_class = transformers.CONFIG_MAPPING[config["model_type"]]
    except KeyError:
        raise ModelLoadError(f"{directory!r}: the plan's model type {config.get('model_type')!r} is not in "
                             "transformers; pass the dense model as sift_compiler.load(path, model=...)") from None
    cls = getattr(transformers, class_name or "", None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelLoadError(f"{directory!r}: the plan names no model class of transformers ({class_name!r}); pass "
                             "the dense model as sift_compiler.load(path, model=...)")
    return cls(config_class.from_dict(config))


def _checkpoint_names_to_model(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """save_pretrained writes some models' keys under their legacy names (Mixtral's ``mlp`` as
    ``block_sparse_moe``); transformers' own renamings give them back. (Its converters, which fuse
    per-expert checkpoint weights, match no key of a compiled model: its experts are not fused.)"""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # another transformers: keys as written
        return state
    return {apply_renamings(key, renamings): value for key, value in state.items()} if renamings else state


def _dense_from_pretrained_config(directory: str) -> nn.Module:
    """The dense model of a save_pretrained directory: its config, random weights, a class of transformers."""
    try:
        import transformers  # optional (the [transformers] extra), and slow to import
    except ImportError:
        raise ModelLoadError("transformers is not installed: pip install 'sift-compiler[transformers]'") from None
    config = transformers.AutoConfig.from_pretrained(directory)  # reads config.json; remote code stays refused
    config.__dict__.pop("sift", None)
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelLoadError(f"{directory!r}: config.json names no model class of transformers ({names}); pass the "
                             "dense model as sift_compiler.load(path, model=...)")
    return cls(config)


def _read_safetensors(directory: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # optional (the [transformers] extra)
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"{directory!r} has no .safetensors weights (save_pretrained writes them by default)")
    state: Dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(directory, name)))
    return state
