"""Export forms: rewrite a compiled graph into an equal function that runtimes run well and right.

Sparse Parallel trains as B branches that read one input (``sum_j act(norm_j(W_j x))``). The same
function can be written several ways, and the way matters on DeepSparse 1.8, which computes sums
of convolutions of one input WRONGLY for B >= 9 (and some B = 4 cases) when nothing sits between
the convs and the sum (docs/deployment.md), and whose speed depends on the form:

========================  ==========================================================================
``branches``              the trained graph as is: B layers, B norms, B activations, an Add chain
``stacked-add``           ONE layer with B*C_out outputs (branch weights concatenated) -> norm -> act,
                          split into B slices, Add chain
``stacked-reduce``        ONE layer -> norm -> act, reshape to (N, B, C_out, ...), ReduceSum over B
                          (DeepSparse does not run ReduceSum itself: it falls back to onnxruntime)
``stacked-conv``          ONE layer -> norm -> act, then a fixed 0/1 1x1 conv (a MatMul for
                          Linear) B*C_out -> C_out that adds the branches. No two layers read one input,
                          so the bug has nothing to match; the norm that follows folds into the 1x1 conv
``auto``                  (default) per layer: branches whose activation is non-linear (ReLU, GELU,
                          SiLU: every sift model) stay ``branches``, exact on every shape tested;
                          linear sums (no activation: the bug's shape) become ``stacked-conv``. The
                          exporter keeps branches only where DeepSparse verified them on the file:
                          it re-exports as ``stacked-conv`` if DeepSparse disagrees with onnxruntime
                          or cannot check (not installed, ``deepsparse="skip"``, ``verify=False``)
========================  ==========================================================================

Measured on ResNet-18 on DeepSparse (2 cores; docs/deployment.md): on idle cores the branch form
is the faster one (batch 64: 1.95x the dense latency at s = 0.9 against 2.28x for ``stacked-conv``,
1.60x against 1.78x at 0.75, equal at 0.5), hence the default ``auto``. When other work shares the
cores the branch form degrades most (2.9-3.3x against 2.1x) while ``stacked-conv`` stays steady
and cannot meet the bug at all: the choice for shared cores, and what ``auto`` falls back to.

Each branch's BatchNorm has per-channel statistics, so stacking them is a norm over B*C_out
channels with the concatenated statistics: the same numbers channel by channel (LayerNorms after
Linear branches normalize each branch's slice on its own). Nothing is approximated;
tests/test_export_forms.py checks every form against the trained module on many shapes,
tests/test_deepsparse_forms.py checks ``stacked-conv`` and ``auto`` on DeepSparse.

``apply_form(gm, form)`` returns a rewritten *copy*; groups that do not have the expected shape
(mixed activations, a norm that is not per-channel) stay as branches and get a note saying why.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import UserInputError
from ..passes.sparse_parallel import ParallelBranches
from ..pipelines import get_transform, transform_names  # pipelines, not registry: it registers the built-in transforms
from ..sparsity.layers import MaskedLayer, new_layer

FORMS = ("auto", "branches", "stacked-add", "stacked-reduce", "stacked-conv")
SAFE_FORM = "stacked-conv"  # no sum of layers that read one input: what "auto" falls back to
DEFAULT_FORM = "auto"     # the fastest on idle cores, kept only where DeepSparse verified it
PARALLEL_RULE = ParallelBranches.sift_rule  # what a re-captured branch module's nodes carry (normalize)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def parallel_rules() -> FrozenSet[str]:
    """The ``sift.rule`` values that mark Sparse Parallel branches: the branch module's own, and the
    rule of every registered transform whose main pass has export forms (a renamed or user-registered
    one included), so no such transform silently misses its forms."""
    specs = (get_transform(name) for name in transform_names())
    return frozenset({PARALLEL_RULE} | {spec.rule for spec in specs if spec.export_forms and spec.rule})


def has_export_forms(transform: str) -> bool:
    """Whether results of ``transform`` have export forms (the registry says; False for unknown names)."""
    return transform in transform_names() and get_transform(transform).export_forms


@dataclass
class ParallelGroup:
    """One call site of a Sparse Parallel layer: B branch chains that read ``source`` and are summed."""

    origin: str
    source: fx.Node
    chains: List[List[fx.Node]]     # per branch: [layer, (norm), act] call_module nodes
    adds: List[fx.Node]             # the Add nodes of the sum, in graph order
    output: fx.Node                 # the node whose value is the sum
    rule: str = PARALLEL_RULE       # the ``sift.rule`` of its nodes, kept on the stacked node

    @property
    def nodes(self) -> List[fx.Node]:
        return [n for chain in self.chains for n in chain] + self.adds


@dataclass
class FormResult:
    """What `apply_form` did: the rewritten module and one line per group it rewrote or refused."""

    module: fx.GraphModule
    form: str
    rewritten: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    branch_groups: List[str] = field(default_factory=list)  # "auto": layers left as activated branches


def _role(node: fx.Node) -> str:
    return str(node.meta.get("sift.role") or "")


def _branch_chain(layer_node: fx.Node, index: int) -> Optional[List[fx.Node]]:
    """[layer, norm?, act] of branch ``index``, following single-user links."""
    chain = [layer_node]
    for suffix in ("norm", "act"):
        users = list(chain[-1].users)
        if len(users) != 1:
            return None
        nxt = users[0]
        if nxt.op == "call_module" and _role(nxt) == f"branches.{index}.{suffix}":
            chain.append(nxt)
        elif suffix == "act":
            return None
    return chain


def _is_branch_add(node: fx.Node, origin: str) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs and node.meta.get("sift.origin") == origin)


def _sum_tree(ends: Sequence[fx.Node], origin: str) -> Optional[Tuple[List[fx.Node], fx.Node]]:
    """The Add nodes that sum exactly ``ends``, each once, and the node holding the sum (or None)."""
    if len(ends) == 1:
        return [], ends[0]
    adds: List[fx.Node] = []
    frontier = list(ends)
    final = None
    while frontier:
        node = frontier.pop()
        users = list(node.users)
        if len(users) == 1 and _is_branch_add(users[0], origin):
            if users[0] not in adds:
                adds.append(users[0])
                frontier.append(users[0])
        elif node in ends or final not in (None, node):
            return None  # a branch output used elsewhere, or two partial sums leave the group
        else:
            final = node
    operands = [a for add in adds for a in add.args]
    if final is None or len(adds) != len(ends) - 1 or sorted(map(id, operands)) != sorted(
            map(id, list(ends) + [a for a in adds if a is not final])):
        return None
    order = {n: i for i, n in enumerate(final.graph.nodes)}
    return sorted(adds, key=order.__getitem__), final


def find_parallel_groups(gm: fx.GraphModule) -> Tuple[List[ParallelGroup], List[str]]:
    """Every Sparse Parallel call site in ``gm``, and a note for each one whose shape is unexpected."""
    by_site: Dict[Tuple[str, fx.Node], Dict[int, fx.Node]] = {}
    rule_of: Dict[Tuple[str, fx.Node], str] = {}
    rules = parallel_rules()
    for node in gm.graph.nodes:
        role = _role(node)
        if node.op != "call_module" or node.meta.get("sift.rule") not in rules:
            continue
        parts = role.split(".")
        if len(parts) == 3 and parts[0] == "branches" and parts[2] == "layer" and node.args:
            key = (str(node.meta.get("sift.origin")), node.args[0])
            by_site.setdefault(key, {})[int(parts[1])] = node
            rule_of[key] = str(node.meta["sift.rule"])
    groups, notes = [], []
    for (origin, source), layers in by_site.items():
        chains = [_branch_chain(layers[j], j) for j in sorted(layers)]
        if any(c is None for c in chains) or sorted(layers) != list(range(len(layers))):
            notes.append(f"{origin}: branches are not layer -> norm -> act chains; kept as branches")
            continue
        tree = _sum_tree([c[-1] for c in chains], origin)
        if tree is None:
            notes.append(f"{origin}: branch outputs are not summed by one Add tree; kept as branches")
            continue
        groups.append(ParallelGroup(origin, source, chains, tree[0], tree[1], rule_of[(origin, source)]))
    return groups, notes


# ---------------------------------------------------------------------------------------------
# The stacked module


def _stack_order(layers: Sequence[nn.Module]) -> List[Tuple[int, int]]:
    """(branch, channel) of each output channel of the stacked layer.

    Branch-major ([branch 0 channels, branch 1 channels, ...]) when groups == 1; a grouped conv
    needs each group's outputs together, so then it is group-major, branch, channel-in-group.
    """
    first = layers[0]
    width = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    groups = 1 if isinstance(first, nn.Linear) else first.groups
    per_group = width // groups
    return [(b, g * per_group + c) for g in range(groups) for b in range(len(layers)) for c in range(per_group)]


def _stack_layer(layers: Sequence[nn.Module], order: List[Tuple[int, int]]) -> nn.Module:
    first = layers[0]
    overrides = ({"out_features": len(order)} if isinstance(first, nn.Linear) else {"out_channels": len(order)})
    stacked = new_layer(first, masked=True, **overrides)
    with torch.no_grad():
        stacked.weight.copy_(torch.stack([layers[b].weight[c] for b, c in order]))
        if any(isinstance(layer, MaskedLayer) for layer in layers):
            stacked.weight_mask.copy_(torch.stack([
                layers[b].weight_mask[c] if isinstance(layers[b], MaskedLayer)
                else torch.ones_like(layers[b].weight[c], dtype=torch.bool) for b, c in order]))
        if first.bias is not None:
            stacked.bias.copy_(torch.stack([layers[b].bias[c] for b, c in order]))
    stacked.target_density = max(getattr(layer, "target_density", 1.0) for layer in layers)
    stacked.mask_parts = len(layers)  # each branch mask was rounded on its own (sparsity checks allow for it)
    return stacked.eval()


def _stack_norm(norms: Sequence[nn.Module], order: List[Tuple[int, int]]) -> nn.Module:
    first = norms[0]
    stacked = type(first)(len(order), eps=first.eps, momentum=first.momentum, affine=first.affine,
                          track_running_stats=first.track_running_stats)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(first, name, None) is not None:
                getattr(stacked, name).copy_(torch.stack([getattr(norms[b], name)[c] for b, c in order]))
    return stacked.to(first.weight.device if first.weight is not None else "cpu").eval()


class BranchLayerNorm(nn.Module):
    """B LayerNorms over the last dim, each on its own branch's D features of a (..., B*D) tensor.

    LayerNorm mixes the features it normalizes, so B of them cannot become one LayerNorm over
    B*D: the features are viewed as (..., B, D), normalized over D, and scaled by each branch's
    own weight and bias (shape (B, D)).
    """

    def __init__(self, norms: Sequence[nn.LayerNorm]) -> None:
        super().__init__()
        first = norms[0]
        self.branches, self.width, self.eps = len(norms), first.normalized_shape[0], first.eps
        ones = torch.ones(self.branches, self.width)
        self.weight = nn.Parameter(torch.stack([n.weight.detach() for n in norms]) if first.elementwise_affine
                                   else ones, requires_grad=False)
        self.bias = nn.Parameter(torch.stack([n.bias.detach() for n in norms])
                                 if first.elementwise_affine and first.bias is not None else ones * 0,
                                 requires_grad=False)

    def forward(self, y):
        lead = y.shape[:-1]
        y = y.reshape(*lead, self.branches, self.width)
        y = nn.functional.layer_norm(y, (self.width,), eps=self.eps) * self.weight + self.bias
        return y.reshape(*lead, self.branches * self.width)


def _stackable_layernorms(norms) -> bool:
    first = norms[0]
    return all(type(n) is nn.LayerNorm and len(n.normalized_shape) == 1 and n.eps == first.eps
               and n.elementwise_affine == first.elementwise_affine
               and (n.bias is None) == (first.bias is None) for n in norms)


def _sum_weight(order: List[Tuple[int, int]], width: int) -> torch.Tensor:
    """S[c, k] = 1 where stacked channel k is a copy of output channel c: y = S @ stacked."""
    weight = torch.zeros(width, len(order))
    for k, (_, c) in enumerate(order):
        weight[c, k] = 1.0
    return weight


class StackedBranches(nn.Module):
    """sum_j act(norm_j(W_j x)) computed as one layer with B*C_out outputs, then a sum over branches.

    ``reduce`` picks how the B slices are added (the forms of the module docstring).
    """

    def __init__(self, layer: nn.Module, norm: Optional[nn.Module], act: nn.Module, order: List[Tuple[int, int]],
                 width: int, reduce: str) -> None:
        super().__init__()
        self.layer, self.norm, self.act = layer, norm, act
        self.branches = len(order) // width
        self.width, self.reduce = width, reduce
        self.linear = isinstance(layer, nn.Linear)
        if reduce == "stacked-conv":
            weight = _sum_weight(order, width).to(layer.weight.dtype)
            if self.linear:
                self.sum = nn.Linear(len(order), width, bias=False)
                self.sum.weight.data.copy_(weight)
            else:
                dims = len(layer.kernel_size)
                self.sum = new_layer(layer, masked=False, in_channels=len(order), out_channels=width,
                                     kernel_size=(1,) * dims, stride=1, padding=0, dilation=1, groups=1, bias=False,
                                     padding_mode="zeros")
                self.sum.weight.data.copy_(weight.view(width, len(order), *(1,) * dims))
            self.sum.requires_grad_(False)
        elif any(c != i % width for i, (_, c) in enumerate(order)):
            raise ValueError(f"{reduce} needs branch-major channels (grouped layers only stack as stacked-conv)")

    def forward(self, x):
        y = self.layer(x)
        if self.norm is not None:
            y = self.norm(y)
        y = self.act(y)
        if self.reduce == "stacked-conv":
            return self.sum(y)
        axis = y.dim() - 1 if self.linear else 1
        if self.reduce == "stacked-add":
            parts = torch.split(y, self.width, dim=axis)
            out = parts[0]
            for part in parts[1:]:
                out = out + part
            return out
        shape = list(y.shape)
        shape[axis:axis + 1] = [self.branches, self.width]
        return y.reshape(shape).sum(axis)


def _same_activation(acts: Sequence[nn.Module]) -> bool:
    return all(type(a) is type(acts[0]) and repr(a) == repr(acts[0]) for a in acts)


def build_stacked(layers: Sequence[nn.Module], norms: Sequence[Optional[nn.Module]], acts: Sequence[nn.Module],
                  form: str) -> Tuple[Optional[nn.Module], str]:
    """A `StackedBranches` equal to the branches, or (None, why not)."""
    first = layers[0]
    if not _same_activation(acts):
        return None, "branches use different activations"
    if any(type(layer) is not type(first) or layer.weight.shape != first.weight.shape for layer in layers):
        return None, "branch layers differ in type or shape"
    if isinstance(first, nn.modules.conv._ConvNd) and (first.transposed or first.padding_mode != "zeros"):
        return None, "transposed or non-zero-padded conv"
    has_norm = [n is not None for n in norms]
    if any(has_norm) and not all(has_norm):
        return None, "only some branches have a norm"
    norm = None
    layer_norms = all(has_norm) and isinstance(first, nn.Linear) and _stackable_layernorms(norms)
    if all(has_norm) and not layer_norms:
        if not all(isinstance(n, _NORMS) and type(n) is type(norms[0]) and n.eps == norms[0].eps
                   and n.affine == norms[0].affine and n.track_running_stats for n in norms):
            return None, (f"branch norm {type(norms[0]).__name__} is neither a per-channel BatchNorm with running "
                          "stats nor a LayerNorm after a Linear")
    order = _stack_order(layers)
    grouped = not isinstance(first, nn.Linear) and first.groups > 1
    if grouped and form != "stacked-conv":
        return None, f"grouped convs stack only as stacked-conv, not {form}"
    if layer_norms:
        norm = BranchLayerNorm(norms)  # Linear layers stack branch-major, as BranchLayerNorm reads them
    elif all(has_norm):
        norm = _stack_norm(norms, order)
    width = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    module = StackedBranches(_stack_layer(layers, order), norm, copy.deepcopy(acts[0]), order, width, form)
    return module.eval(), ""


def keeps_branches(acts: Sequence[nn.Module]) -> bool:
    """The "auto" policy: branches with a non-linear activation stay branches (see the module docstring)."""
    return all(not isinstance(a, nn.Identity) for a in acts)


def apply_form(gm: fx.GraphModule, form: str = DEFAULT_FORM) -> FormResult:
    """A copy of ``gm`` with every Sparse Parallel call site in ``form`` (see the module docstring)."""
    if form not in FORMS:
        raise UserInputError(f"unknown export form {form!r}: choose one of {', '.join(FORMS)}")
    gm = copy.deepcopy(gm)
    result = FormResult(gm, form)
    if form == "branches":
        return result
    groups, result.notes = find_parallel_groups(gm)
    built: Dict[str, nn.Module] = {}
    for group in groups:
        if len(group.chains) == 1:  # one branch is already one layer -> norm -> act: nothing to stack
            continue
        path = f"{group.origin}.stacked"
        mods = [[gm.get_submodule(str(n.target)) for n in chain] for chain in group.chains]
        if form == "auto" and keeps_branches([m[-1] for m in mods]):
            result.branch_groups.append(group.origin)
            continue
        chosen = SAFE_FORM if form == "auto" else form
        module = built.get(path)
        if module is None:
            norms = [m[1] if len(m) == 3 else None for m in mods]
            module, why = build_stacked([m[0] for m in mods], norms, [m[-1] for m in mods], chosen)
            if module is None:
                result.notes.append(f"{group.origin}: {why}; kept as branches")
                continue
            gm.add_submodule(path, module)
            built[path] = module
        _replace_group(gm, group, path)
        result.rewritten.append(f"{group.origin}: {len(group.chains)} branches -> {chosen}")
    if built:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    return result


def _replace_group(gm: fx.GraphModule, group: ParallelGroup, path: str) -> None:
    source = group.chains[0][0].args[0]  # not group.source: rewriting an earlier call site may have replaced it
    with gm.graph.inserting_before(group.output):
        node = gm.graph.call_module(path, (source,))
    node.meta.update({"sift.origin": group.origin, "sift.rule": group.rule, "sift.role": "stacked"})
    if "stack_trace" in group.output.meta:
        node.meta["stack_trace"] = group.output.meta["stack_trace"]
    group.output.replace_all_uses_with(node)
    for old in reversed(group.nodes):
        gm.graph.erase_node(old)
