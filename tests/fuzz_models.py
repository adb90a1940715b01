"""Random models for the compiler, drawn by hypothesis, and the checks each compiled one must pass.

A case is plain data (a dict), so a failure prints something you can rebuild with ``build(spec)``:

- ``mlp``: Linear stacks, activations, LayerNorm, residual adds, a layer called twice (tied);
- ``cnn``: Conv1d/2d stems and blocks: residual adds, concatenations, grouped and depthwise convs,
  squeeze-excite gates, pooling, a Linear head;
- ``attention``: transformer blocks on token ids (tied embedding and LM head) or on vectors,
  attention written as sdpa, explicit matmuls, einsum, nanoGPT (sizes read from the input) or
  timm (one 5-D reshape).

`check(spec, transform, sparsity, workdir)` compiles the case and returns an `Outcome`: "ok",
"refused" (a model whose dense first and last layers outweigh the rest cannot be paid for, or
that has nothing but a first and a last layer, and says so) or a failure kind with its message. Used by the smoke test (`test_fuzz_smoke.py`) and `tests/fuzz.py`.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

import sift_compiler as sift
from sift_compiler.analyses.flops import FlopAnalysis
from sift_compiler.errors import PassError, SiftWarning, first_line
from sift_compiler.sparsity.layers import MaskedLayer
from sift_compiler.testing import assert_masks_exact
from checks import assert_allclose_outputs, independent_weight_flops

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
TRANSFORMS = ("wide", "parallel", "factorized", "doped")


# -- the models ----------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        widths, act = spec["widths"], ACTIVATIONS[spec["act"]]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(b) if spec["norm"] else nn.Identity() for b in widths[1:])
        self.act = act()
        self.shared = nn.Linear(widths[-1], widths[-1]) if spec["shared"] else None
        self.head = nn.Linear(widths[-1], spec["classes"])

    def forward(self, x):
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            y = norm(self.act(layer(x)))
            if self.spec["residual"] and y.shape == x.shape and i > 0:
                y = x + y
            x = y
        if self.shared is not None:  # one Linear called twice: its weight is used by two nodes
            x = self.act(self.shared(x))
            x = x + self.act(self.shared(x))
        return self.head(x)


class CNN(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        conv, norm_cls = (nn.Conv1d, nn.BatchNorm1d) if spec["dims"] == 1 else (nn.Conv2d, nn.BatchNorm2d)
        if spec["norm"] == "group":
            norm_cls = lambda c: nn.GroupNorm(4, c)  # noqa: E731 - every width here is a multiple of 4
        self.dims = spec["dims"]
        self.spatial = 16 if self.dims == 1 else 8
        c = spec["stem"]
        self.stem = nn.Sequential(conv(3, c, 3, padding=1), norm_cls(c), nn.ReLU())
        self.blocks = nn.ModuleList()
        for kind in spec["blocks"]:
            block, c = self._block(kind, c, conv, norm_cls)
            self.blocks.append(block)
        self.head = nn.Linear(c, spec["classes"])

    def _block(self, kind, c, conv, norm_cls):
        k, g = self.spec["kernel"], self.spec["groups"]
        pad = k // 2
        if kind in ("residual", "grouped"):
            groups = g if kind == "grouped" and c % g == 0 else 1
            return nn.Sequential(conv(c, c, k, padding=pad, groups=groups), norm_cls(c), nn.ReLU(),
                                 conv(c, c, 1), norm_cls(c)), c
        if kind == "concat":
            return nn.Sequential(conv(c, self.spec["growth"], k, padding=pad), nn.ReLU()), c + self.spec["growth"]
        if kind == "depthwise":
            return nn.Sequential(conv(c, c, 3, padding=1, groups=c), norm_cls(c), nn.ReLU6(), conv(c, c, 1)), c
        if kind == "down" and self.spatial >= 4:  # ResNet's downsampling block with a shortcut projection
            self.spatial //= 2
            main = nn.Sequential(conv(c, 2 * c, 3, stride=2, padding=1), norm_cls(2 * c), nn.ReLU(),
                                 conv(2 * c, 2 * c, 3, padding=1), norm_cls(2 * c))
            return nn.ModuleList([main, nn.Sequential(conv(c, 2 * c, 1, stride=2), norm_cls(2 * c))]), 2 * c
        if kind in ("widen", "down"):
            return nn.Sequential(conv(c, 2 * c, 1), norm_cls(2 * c), nn.ReLU()), 2 * c
        if kind == "se":
            return nn.Sequential(nn.Linear(c, max(c // 4, 8)), nn.ReLU(), nn.Linear(max(c // 4, 8), c)), c
        if self.spatial < 4:  # "pool", while there is something left to pool
            return nn.Identity(), c
        self.spatial //= 2
        return (nn.MaxPool1d(2) if self.dims == 1 else nn.MaxPool2d(2)), c

    def forward(self, x):
        x = self.stem(x)
        for kind, block in zip(self.spec["blocks"], self.blocks):
            if kind in ("residual", "grouped", "depthwise"):
                x = torch.relu(x + block(x))
            elif kind == "concat":
                x = torch.cat([x, block(x)], 1)
            elif isinstance(block, nn.ModuleList):
                x = torch.relu(block[0](x) + block[1](x))
            elif kind == "se":
                gate = torch.sigmoid(block(x.mean(dim=tuple(range(2, 2 + self.dims)))))
                for _ in range(self.dims):
                    gate = gate.unsqueeze(-1)
                x = x * gate
            else:
                x = block(x)
        return self.head(torch.flatten(F.adaptive_avg_pool1d(x, 1) if self.dims == 1 else
                                       F.adaptive_avg_pool2d(x, 1), 1))


class Attention(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.heads, self.head_dim, self.style = spec["heads"], spec["head_dim"], spec["style"]
        d = self.heads * self.head_dim
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.size()
        if self.style == "timm":
            qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = self.qkv(x).split(C, dim=2) if self.style == "nanoGPT" else self.qkv(x).chunk(3, dim=-1)
            head_dim = C // self.heads if self.style == "nanoGPT" else self.head_dim
            q, k, v = (t.view(B, T, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if self.style == "matmul":
            y = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1) @ v
        elif self.style == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.head_dim ** -0.5
            y = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.style == "nanoGPT")
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Transformer(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        d = spec["heads"] * spec["head_dim"]
        self.embed = nn.Embedding(spec["vocab"], d) if spec["ids"] else nn.Linear(spec["features"], d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d)) if spec["cls"] and not spec["ids"] else None
        self.pos = nn.Parameter(torch.randn(1, spec["tokens"] + (self.cls is not None), d) * 0.02)
        act = ACTIVATIONS[spec["act"]]
        self.blocks = nn.ModuleList()
        for _ in range(spec["layers"]):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(d), "attn": Attention(spec), "ln2": nn.LayerNorm(d),
                "mlp": nn.Sequential(nn.Linear(d, spec["ffn"] * d), act(), nn.Linear(spec["ffn"] * d, d))}))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, spec["vocab"] if spec["ids"] else spec["classes"], bias=not spec["tied"])
        if spec["ids"] and spec["tied"]:
            self.head.weight = self.embed.weight

    def forward(self, x):
        x = self.embed(x)
        if self.cls is not None:  # ViT's class token: a parameter expanded to the batch, joined on tokens
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos
        for block in self.blocks:
            x = x + block["attn"](block["ln1"](x))
            x = x + block["mlp"](block["ln2"](x))
        x = self.ln_f(x)
        if self.spec["ids"]:
            return self.head(x)
        return self.head(x[:, 0] if self.cls is not None else x.mean(1))


FAMILIES = {"mlp": MLP, "cnn": CNN, "attention": Transformer}


# -- the strategies ------------------------------------------------------------------------
def _mlp():
    return st.fixed_dictionaries({
        "family": st.just("mlp"), "widths": st.lists(st.sampled_from([24, 32, 36, 48, 64, 96, 100]), min_size=4, max_size=6),
        "act": st.sampled_from(sorted(ACTIVATIONS)), "norm": st.booleans(), "residual": st.booleans(),
        "shared": st.booleans(), "classes": st.sampled_from([5, 10]), "rows": st.sampled_from([(2,), (2, 3)])})


def _cnn():
    kinds = ["residual", "concat", "grouped", "depthwise", "widen", "se", "pool", "down"]
    return st.fixed_dictionaries({
        "family": st.just("cnn"), "dims": st.sampled_from([1, 2]), "stem": st.sampled_from([16, 24, 32]),
        "blocks": st.lists(st.sampled_from(kinds), min_size=2, max_size=5), "kernel": st.sampled_from([1, 3, 5]),
        "groups": st.sampled_from([2, 4]), "growth": st.sampled_from([8, 16]), "classes": st.sampled_from([5, 10]),
        "norm": st.sampled_from(["batch", "batch", "group"])})


def _attention():
    return st.fixed_dictionaries({
        "family": st.just("attention"), "heads": st.sampled_from([1, 2, 3, 4, 6]),
        "head_dim": st.sampled_from([8, 12, 16]), "cls": st.booleans(),
        "style": st.sampled_from(["sdpa", "matmul", "einsum", "nanoGPT", "timm"]), "layers": st.sampled_from([1, 2]),
        "ffn": st.sampled_from([2, 4]), "act": st.sampled_from(["gelu", "relu"]), "ids": st.booleans(),
        "tied": st.booleans(), "vocab": st.sampled_from([16, 32]), "features": st.sampled_from([8, 16]),
        "tokens": st.sampled_from([4, 8]), "classes": st.sampled_from([5, 10])})


def cases():
    """A model spec, a sparsity, Sparse Wide's options (attention width, rounding) and a model seed."""
    wide = st.fixed_dictionaries({"attention_width": st.sampled_from(["keep", "scale"]),
                                  "round_to": st.sampled_from([1, 1, 8])})
    return st.tuples(st.one_of(_mlp(), _cnn(), _attention()), st.sampled_from([0.5, 0.75, 0.9]), wide,
                     st.integers(0, 2 ** 16))


def build(spec: Dict[str, Any], seed: int = 0) -> Tuple[nn.Module, Tuple[torch.Tensor, ...]]:
    """The model of ``spec`` (weights from ``seed``) and an example input."""
    torch.manual_seed(seed)
    model = FAMILIES[spec["family"]](spec)
    if spec["family"] == "mlp":
        x = torch.randn(*spec["rows"], spec["widths"][0])
    elif spec["family"] == "cnn":
        x = torch.randn(2, 3, *((16,) * spec["dims"] if spec["dims"] == 1 else (8, 8)))
    elif spec["ids"]:
        x = torch.randint(0, spec["vocab"], (2, spec["tokens"]))
    else:
        x = torch.randn(2, spec["tokens"], spec["features"])
    return model.eval(), (x,)


# -- the checks ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    kind: str          # "ok", "refused", or the failure kind
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.kind not in ("ok", "refused")


class Failure(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def check(spec, transform: str, sparsity: float, workdir: str, seed: int = 0, options=None) -> Outcome:
    """Compile ``spec`` with ``transform`` (and compile ``options``) and run every check; never raises."""
    model, inputs = build(spec, seed)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SiftWarning)
            result = sift.compile(model, transform, sparsity, inputs, seed=seed, **(options or {}))
    except PassError as e:
        if "no sparsity can make this model iso-FLOP" in str(e):
            return Outcome("refused")
        return Outcome(f"compile: {type(e).__name__}", first_line(e))
    except Exception as e:  # noqa: BLE001 - every failure is counted by kind
        return Outcome(f"compile: {type(e).__name__}", first_line(e))
    said = [str(w.message) for w in caught if issubclass(w.category, SiftWarning)]
    if not any(isinstance(m, MaskedLayer) for m in result.module.modules()):
        # only a first and a last layer (a CNN of pools): nothing to transform, and it must say so
        return Outcome("refused") if any("no layer could be transformed" in w for w in said) else \
            Outcome("nothing transformed, silently", f"{transform} left every layer dense without a warning")
    try:
        _check_result(spec, model, inputs, result, transform, workdir, said)
    except Failure as e:
        return Outcome(e.kind, str(e))
    except Exception as e:  # noqa: BLE001
        return Outcome(f"check crashed: {type(e).__name__}", first_line(e))
    return Outcome("ok")


def _step(kind: str, fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        raise Failure(kind, f"{type(e).__name__}: {first_line(e)}") from e


def _check_result(spec, model, inputs, result, transform, workdir, sift_warnings: List[str]) -> None:
    module = result.module
    with torch.no_grad():
        dense_shape = model(*inputs).shape
    _step("masks", assert_masks_exact, module)
    module.train()
    out = _step("forward", module, *inputs)
    if out.shape != dense_shape:
        raise Failure("output shape", f"{tuple(out.shape)} instead of {tuple(dense_shape)}")
    _step("backward", lambda: out.float().pow(2).mean().backward())
    _check_gradients(module)
    module.zero_grad(set_to_none=True)
    module.eval()
    _check_flops(model, inputs, result)
    _check_onnx(module, inputs, os.path.join(workdir, f"{transform}.onnx"))
    if transform == "wide":
        _check_wide(spec, model, module, sift_warnings)


def _check_gradients(module) -> None:
    """No gradient on a masked weight; some on unmasked ones. Per model, not per layer: a layer
    left with one weight per channel before a BatchNorm gets none (the norm undoes its scale)."""
    reached = False
    for name, layer in module.named_modules():
        if isinstance(layer, MaskedLayer):
            grad = layer.weight.grad
            if grad is None:
                raise Failure("gradients", f"{name}: no gradient")
            if bool(((grad != 0) & ~layer.weight_mask).any()):
                raise Failure("gradients", f"{name}: gradient reaches masked weights")
            reached |= bool(((grad != 0) & layer.weight_mask).any())
    if not reached:
        raise Failure("gradients", "no gradient reaches any unmasked weight")


def _check_flops(model, inputs, result) -> None:
    """The report against FlopCounterMode x non-zeros, and iso-FLOP against the dense model's count.

    The report counts mask entries; the weights computed with may hold fewer non-zeros only where a
    layer copied a weight that is exactly 0 in the dense model (Doped's M, shortcut projections):
    torch's own init draws an exact 0 about once in 10^7 weights."""
    by_mask = independent_weight_flops(result.module, inputs, {}, by_mask=True)
    independent = independent_weight_flops(result.module, inputs, {})
    if not math.isclose(result.report.sift_flops, by_mask, rel_tol=1e-6):
        raise Failure("flops: report vs FlopCounterMode",
                      f"report {result.report.sift_flops:.9g}, FlopCounterMode x mask {by_mask:.9g}")
    dense_zeros = any(bool((m.weight == 0).any()) for m in model.modules()
                      if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)))
    if not math.isclose(independent, by_mask, rel_tol=1e-6) and not (independent < by_mask and dense_zeros):
        raise Failure("flops: zero weights inside masks",
                      f"FlopCounterMode x nnz(W*M) {independent:.9g}, x mask {by_mask:.9g}")
    dense = independent_weight_flops(model, inputs, {})
    ratio = independent / dense
    if abs(ratio - 1) > max(0.005, _rounding_bound(result)):
        raise Failure("iso-FLOP", f"sift/dense = {ratio:.5f} by FlopCounterMode (bound {_rounding_bound(result):.4f})")


def _rounding_bound(result) -> float:
    """The most exact-count masks can miss the target by: half a weight per masked layer."""
    counts = result.unit.analyses.get(FlopAnalysis)
    positions = sum(n.dense / (2 * n.numel) for n in counts.nodes.values() if n.numel and n.nnz < n.numel)
    return positions / max(result.unit.baseline.weight_dense, 1e-12)


def _check_onnx(module, inputs, path) -> None:
    import onnxruntime as ort
    info = _step("onnx: export", lambda: sift.export_onnx(module, inputs, path, verify=False, deepsparse="skip"))
    session = _step("onnx: load", ort.InferenceSession, path, None, ["CPUExecutionProvider"])
    feed = {name: t.numpy() for name, t in zip(info.input_names, inputs)}
    got = _step("onnx: run", session.run, None, feed)
    with torch.no_grad():
        expected = module(*inputs).numpy()
    _step("onnx: differs from torch", assert_allclose_outputs, got, [expected])
    for leftover in (path, path + ".data"):
        if os.path.exists(leftover):
            os.remove(leftover)


def _check_wide(spec, model, module, sift_warnings: List[str]) -> None:
    """Every weight layer is wider on some side, grouped convs stay valid, ties stay tied, and no
    layer was kept at width for a reason the user did not ask for (all ops here have rules)."""
    kept = [w for w in sift_warnings if "kept at width" in w]
    if kept:
        raise Failure("wide: kept at width", kept[0])
    for name, old in model.named_modules():
        if not isinstance(old, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        new = module.get_submodule(name)
        sizes = lambda m: (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
        (a, b), (c, d) = sizes(old), sizes(new)
        if c < a or d < b or (c, d) == (a, b):
            raise Failure("wide: layer not widened", f"{name}: {a}->{b} became {c}->{d}")
        if isinstance(new, nn.modules.conv._ConvNd) and (c % new.groups or d % new.groups or
                                                          (old.groups == a == b) != (new.groups == c == d)):
            raise Failure("wide: grouped conv", f"{name}: {c}->{d} groups {new.groups} (was {a}->{b} / {old.groups})")
    if spec.get("tied") and spec.get("ids") and module.get_submodule("head").weight is not \
            module.get_submodule("embed").weight:
        raise Failure("wide: tie broken", "head and embedding no longer share their weight")


def summarize(outcomes: Dict[str, List[Outcome]], seconds: Dict[str, float]) -> str:
    """A table: per transform, cases, ok, refused, and failures by kind."""
    kinds = sorted({o.kind for rows in outcomes.values() for o in rows if o.failed})
    head = f"{'transform':<11}{'cases':>7}{'ok':>7}{'refused':>9}{'failed':>8}{'time s':>9}"
    lines = [head, "-" * len(head)]
    for transform, rows in outcomes.items():
        failed = sum(o.failed for o in rows)
        lines.append(f"{transform:<11}{len(rows):>7}{sum(o.kind == 'ok' for o in rows):>7}"
                     f"{sum(o.kind == 'refused' for o in rows):>9}{failed:>8}{seconds[transform]:>9.0f}")
    if kinds:
        lines += ["", "failures by kind:"]
        for kind in kinds:
            per = ", ".join(f"{t} {sum(o.kind == kind for o in rows)}" for t, rows in outcomes.items()
                            if any(o.kind == kind for o in rows))
            lines.append(f"  {kind}: {per}")
    return "\n".join(lines)


__all__ = ["FAMILIES", "Outcome", "TRANSFORMS", "build", "cases", "check", "summarize"]
