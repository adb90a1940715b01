"""Model sources: the MODEL argument of the CLI -> an `nn.Module` and example inputs.

==========================  ===============================================================
``torchvision:NAME``        ``torchvision.models.get_model(NAME, weights=None)``
``timm:NAME``               ``timm.create_model(NAME, pretrained=False)``
``transformers:MODEL_TYPE`` the default config of that type, random weights, never downloaded;
                            the masked-LM head if the type has one, else the causal-LM head;
                            or a preset of the paper's shapes: ``gpt3-small`` (125M),
                            ``gpt3-xl`` (1.3B), ``llama2-7b`` (`PRESETS`)
``package.module:callable`` ``callable(**options)``: the user's own code, imported by name
``FILE.pt``                 a ``torch.save(model)`` pickle: refused unless ``trust_pickle``
==========================  ===============================================================

Any source takes options after commas, passed to its constructor (to the config for
transformers): ``torchvision:resnet18,num_classes=10``, ``transformers:gpt2,n_layer=2``.
Nothing is ever downloaded: no pretrained weights, no hub configs.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import ModelLoadError, UserInputError, first_line
from ..io import load_weights_only

FAMILIES = ("torchvision", "timm", "transformers")

# The paper's language models (Table 14: GPT-3 Small; Figure 3: XL) and Llama-2 7B, by config:
# name -> (transformers model type, config options). Options given after the name override them.
PRESETS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "gpt3-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, n_positions=2048,
                                vocab_size=50257)),
    "gpt3-xl": ("gpt2", dict(n_layer=24, n_embd=2048, n_head=16, n_inner=8192, n_positions=2048,
                             vocab_size=50257)),
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                max_position_embeddings=4096, rms_norm_eps=1e-5)),
}
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class ModelSource:
    """A model and the example inputs it is captured with."""

    module: nn.Module
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    spec: str
    family: str
    input_shape: Tuple[int, ...]
    input_dtype: torch.dtype
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> List[str]:
        return list(self.kwargs) if self.kwargs else ["input"]

    def describe_input(self) -> str:
        return f"{','.join(map(str, self.input_shape))} {str(self.input_dtype).replace('torch.', '')}"


def parse_input_shape(text: str) -> Tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224), with a clear error for anything else."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise UserInputError(f"--input-shape {text!r} is not a comma-separated list of integers "
                             "(e.g. 1,3,224,224)") from None
    if not shape or any(d <= 0 for d in shape):
        raise UserInputError(f"--input-shape {text!r} needs positive sizes (e.g. 1,3,224,224)")
    return shape


def parse_dtype(text: str) -> torch.dtype:
    table = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16, "int64": torch.int64, "long": torch.int64, "int32": torch.int32}
    if text not in table:
        raise UserInputError(f"--input-dtype {text!r} is not one of {sorted(table)}")
    return table[text]


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """'torchvision:resnet18,num_classes=10' -> ('torchvision:resnet18', {'num_classes': 10})."""
    head, *rest = spec.split(",")
    options = {}
    for item in rest:
        if "=" not in item:
            raise UserInputError(f"model option {item!r} in {spec!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        options[key.strip()] = _parse_value(value.strip())
    return head, options


def _suggest(name: str, known: List[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _torchvision(name: str, options: Dict[str, Any]) -> nn.Module:
    import torchvision  # optional (the [vision] extra), and slow to import
    known = torchvision.models.list_models()
    if name not in known:
        raise UserInputError(f"unknown torchvision model {name!r}{_suggest(name, known)} "
                             "(torchvision.models.list_models() lists them)")
    return torchvision.models.get_model(name, weights=None, **options)


def _timm(name: str, options: Dict[str, Any]) -> nn.Module:
    try:
        import timm  # optional (the [vision] extra), and slow to import
    except ImportError:
        raise ModelLoadError("timm is not installed: pip install 'sift-compiler[vision]'") from None
    if not timm.is_model(name):
        raise UserInputError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}")
    return timm.create_model(name, pretrained=False, **options)


def _transformers(model_type: str, options: Dict[str, Any]) -> nn.Module:
    try:
        import transformers  # optional (the [transformers] extra), and slow to import
        from transformers import AutoConfig
    except ImportError:
        raise ModelLoadError("transformers is not installed: pip install 'sift-compiler[transformers]'") from None
    from transformers.models.auto import modeling_auto as auto
    if model_type in PRESETS:
        model_type, defaults = PRESETS[model_type]
        options = {**defaults, **options}
    try:
        config = AutoConfig.for_model(model_type, **options)
    except (ValueError, KeyError):
        known = sorted(auto.MODEL_MAPPING_NAMES) + sorted(PRESETS)
        raise UserInputError(f"unknown transformers model type {model_type!r}{_suggest(model_type, known)}") from None
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        cls = transformers.AutoModelForMaskedLM
    elif model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        cls = transformers.AutoModelForCausalLM
    else:
        cls = transformers.AutoModel
    return cls.from_config(config)


def _callable(path: str, options: Dict[str, Any]) -> nn.Module:
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import {module_name!r} for model {path!r}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelLoadError(f"module {module_name!r} has no attribute {attr!r}")
    model = factory(**options) if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{path!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def read_model_file(path: str, trust_pickle: bool) -> nn.Module:
    """A model saved with ``torch.save(model)``; only unpickled when the user trusts the file."""
    if not os.path.exists(path):
        raise ModelLoadError(f"model file {path!r} does not exist")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path!r} is a directory, not a model file")
    if not _looks_like_torch_save(path):
        raise ModelLoadError(f"cannot read model file {path!r}: not a file written by torch.save "
                             "(neither a torch zip archive nor a pickle)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights-only unpickling refuses code objects: a full pickle
        text = str(e)
        if "Weights only load failed" not in text and "weights_only" not in text:
            raise ModelLoadError(f"cannot read model file {path!r}: not a file written by torch.save "
                                 f"({type(e).__name__}: {first_line(e) or 'corrupt'})") from None
        if not trust_pickle:
            raise ModelLoadError(
                f"{path!r} is a pickled model (torch.save(model)); loading it runs code stored in the file. "
                "Pass --trust-pickle if you trust its author, or save a state dict and name the architecture "
                "(e.g. torchvision:resnet18 --weights FILE).") from None
        try:
            content = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ModelLoadError(f"cannot unpickle {path!r}: {type(e2).__name__}: {e2}") from None
    if isinstance(content, nn.Module):
        return content
    if isinstance(content, dict) and content.get("format", "").startswith("sift-compiler"):
        raise ModelLoadError(f"{path!r} is a compiled sift-compiler model: load it with sift_compiler.load(path)")
    if isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ModelLoadError(
            f"{path!r} holds a state dict ({len(content)} tensors), not a model: name the architecture as MODEL "
            "and pass the file as --weights (e.g. sift-compile torchvision:resnet18 --weights FILE).")
    raise ModelLoadError(f"{path!r} holds a {type(content).__name__}, not a torch.nn.Module")


def _looks_like_torch_save(path: str) -> bool:
    """torch.save writes a zip archive (or, in the legacy format, a pickle: protocol byte 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict file (read without running code) into ``model``."""
    state = load_weights_only(path, "weights file {path!r} does not exist",
                              "cannot read weights file {path!r} as a state dict: {reason}")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"weights in {path!r} do not fit the model: {first_line(e)} ...") from None


def default_input(family: str, model: nn.Module) -> Tuple[Tuple[int, ...], torch.dtype]:
    if family == "transformers":
        return (1, 128), torch.int64
    if family == "timm":
        size = getattr(model, "pretrained_cfg", {}).get("input_size") or (3, 224, 224)
        return (1, *size), torch.float32
    return (1, 3, 224, 224), torch.float32


def example_inputs(model: nn.Module, family: str, shape: Tuple[int, ...], dtype: torch.dtype,
                   seed: int = 0) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """Random example inputs: token ids below the vocabulary size, or standard normal images."""
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=generator).to(dtype)
    else:
        vocab = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
        x = torch.randint(0, min(vocab) if vocab else 2, shape, generator=generator, dtype=dtype)
    if family == "transformers":
        return (), {"input_ids": x}
    return (x,), {}


def load_model(spec: str, input_shape: Optional[Tuple[int, ...]] = None, input_dtype: Optional[torch.dtype] = None,
               trust_pickle: bool = False, weights: Optional[str] = None, meta: bool = False) -> ModelSource:
    """Build the model named by ``spec`` with example inputs (see the module docstring).

    ``meta``: build a library model on the meta device (shapes only, nothing allocated: a 7B model
    compiles in seconds; `initialization.materialize` gives it values later).
    """
    head, options = split_spec(spec)
    prefix, _, name = head.partition(":")
    if meta and (prefix not in FAMILIES or weights):
        raise UserInputError("--meta builds torchvision:, timm: and transformers: models without weights; "
                             f"{spec!r}{' with --weights' if weights else ''} has weights to load")
    if prefix in FAMILIES and name:
        family = prefix
        builder = {"torchvision": _torchvision, "timm": _timm, "transformers": _transformers}[prefix]
        try:
            with torch.device("meta") if meta else contextlib.nullcontext():
                model = builder(name, options)
        except (UserInputError, ModelLoadError):
            raise
        except TypeError as e:
            raise UserInputError(f"bad option for {head!r}: {e}") from None
    elif os.path.exists(head) or head.endswith((".pt", ".pth", ".bin", ".pkl")) or "/" in head:
        family, model = "file", read_model_file(head, trust_pickle)
    elif _CALLABLE.match(head):
        family, model = "callable", _callable(head, options)
    else:
        raise UserInputError(f"MODEL {spec!r} is not torchvision:NAME, timm:NAME, transformers:TYPE, "
                             "package.module:callable or an existing file")
    if weights:
        load_weights(model, weights)
    shape, dtype = default_input(family, model)
    shape = tuple(input_shape) if input_shape else shape
    dtype = input_dtype or dtype
    if family == "transformers" and dtype.is_floating_point:
        raise UserInputError("transformers models take int64 token ids: use --input-dtype int64")
    args, kwargs = example_inputs(model, family, shape, dtype)
    return ModelSource(model, args, kwargs, spec, family, shape, dtype, options)
