"""Independent checks of a compiled model, used by many tests and by benchmarks/support_matrix.py.

The support matrix's checks (issue 16), each one function that raises AssertionError with what
broke: `assert_iso_flop` (within the rounding bound, recounted on the masks as they are now),
`assert_native_equals_graph` (at a batch the compiler did not check), `assert_generate_equals_recompute`
(the KV cache decodes what a full recompute decodes), `assert_rigl_keeps_exact_counts` (a few RigL
steps, every masked layer and expert keeps its planned count) and `assert_onnx_matches`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Dict

import numpy as np
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from sift_compiler.analyses.flops import count_flops
from sift_compiler.analyses.shapes import ShapeAnalysis
from sift_compiler.native import relative_error
from sift_compiler.passes.verify import rounding_bound
from sift_compiler.sparsity.init import exact_count
from sift_compiler.sparsity.layers import WEIGHT_LAYER_TYPES, MaskedLayer, iter_masked
from sift_compiler.sparsity.rigl import RigL


def exit_status(main, argv) -> int:
    """The exit status a console script's ``main`` would give (argparse errors raise SystemExit)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code)


def tensors(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def independent_weight_flops(module: nn.Module, args, kwargs, by_mask: bool = False) -> float:
    """Weight-layer FLOPs per sample by torch's own FlopCounterMode (shape-based, dense), each masked
    layer scaled by the fraction of its effective weight that is non-zero (counted on the tensors;
    ``by_mask``: the fraction of its mask that is set)."""
    counter = FlopCounterMode(display=False)
    module.eval()
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    counts = counter.get_flop_counts()
    root = type(module).__name__  # FlopCounterMode prefixes names with the root module's class name
    total = 0.0
    for name, layer in module.named_modules():
        if not isinstance(layer, WEIGHT_LAYER_TYPES):
            continue
        flops = sum(counts.get(f"{root}.{name}", {}).values())
        if isinstance(layer, MaskedLayer):  # count the zeros in the weights the layer computes with
            weight = layer.weight_mask if by_mask else layer.masked_weight()
            flops = flops * int(torch.count_nonzero(weight)) / weight.numel()
        total += flops  # dense layers count dense, even where a weight happens to be 0
    batch = tensors((args, kwargs))[0].shape[0]
    return total / batch


def assert_grads_only_unmasked(module: nn.Module) -> None:
    any_masked = False
    for name, layer in iter_masked(module):
        any_masked = True
        grad = layer.weight.grad
        assert grad is not None, f"{name}: no gradient"
        nonzero = grad != 0
        assert not bool((nonzero & ~layer.weight_mask).any()), f"{name}: gradient reaches masked weights"
        assert bool((nonzero & layer.weight_mask).any()), f"{name}: no gradient reaches unmasked weights"
    assert any_masked, "no masked layers"


def assert_allclose_outputs(actual, expected, rtol=1e-3, atol_scale=1e-4) -> None:
    for a, e in zip(actual, expected):
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol_scale * max(1.0, float(np.abs(e).max())))


def run_script(script: str, *args: str, ranks: int = 1, timeout: int = 600) -> None:
    """Run a test file as a program (its ``__main__``) in a fresh process, or under torchrun with
    ``ranks`` gloo processes, one torch thread each and the repository on the path; fails the
    test with the end of its output if it exits non-zero."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NM_DISABLE_ANALYTICS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    prefix = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    run = subprocess.run(prefix + [os.path.abspath(script), *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]


_FLOAT_SLACK = 1e-9  # relative, as VerifyPass: float sums in another order


def assert_iso_flop(result) -> float:
    """The compiled graph's weight FLOPs, counted again on its masks as they are now, equal what
    the report says and the dense model's within what per-mask rounding explains (VerifyPass's
    bound; only above 1 where compensation capped the density at 1). A mixture of experts counts
    per token with the active experts: an expert's layers see top_k / num_experts of the tokens.
    Returns sift / dense."""
    unit = result.unit
    assert unit.baseline is not None, "no dense baseline: the result was not compiled iso-FLOP"
    counts = count_flops(result.graph_module, unit.analyses.get(ShapeAnalysis), unit.batch_size)
    dense = unit.baseline.weight_dense
    ratio = counts.weight_effective / dense
    allowed = rounding_bound(counts) / dense + _FLOAT_SLACK
    capped = unit.effective_sparsity is not None and unit.effective_sparsity <= 0.0
    miss = ratio - 1 if capped else abs(ratio - 1)
    assert miss <= allowed, f"not iso-FLOP: sift/dense = {ratio:.6f}, more than the {allowed:.3g} mask rounding explains"
    reported = result.report.flop_ratio
    assert abs(ratio - reported) <= 10 * _FLOAT_SLACK, \
        f"the masks give sift/dense = {ratio:.9f}, the report says {reported:.9f}: a mask changed after compile"
    return ratio


def grown(tree):
    """The inputs at batch + 2 (the first sample twice more): a size the compiler's own native check did not use."""
    def grow(t):
        return torch.cat([t, t[:1], t[:1]]) if isinstance(t, torch.Tensor) and t.dim() else t
    return pytree.tree_map(grow, tree)


def assert_native_equals_graph(result, case, tolerance: float = 1e-5) -> None:
    """The native model (the user's class) computes what the graph form computes, at batch + 2."""
    args, kwargs = grown(case.args), grown(case.kwargs)
    with torch.no_grad():
        native = tensors(result.module.eval()(*args, **kwargs))
        graph = tensors(result.graph_module.eval()(*args, **kwargs))
    error = relative_error(native, graph)
    assert error <= tolerance, f"native model and graph form differ at batch + 2: relative error {error:.3g} > {tolerance:g}"


def _pick(model: nn.Module, logits: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """The greedy token generate() picks with min_new_tokens = steps: end-of-sequence suppressed,
    except where the config forces it at the last position (BART's forced_eos_token_id)."""
    config = model.generation_config
    forced = getattr(config, "forced_eos_token_id", None)
    if forced is not None and step == steps - 1:
        return torch.full((logits.shape[0], 1), forced, dtype=torch.long)
    eos = config.eos_token_id
    logits = logits[:, -1].clone()
    logits[:, [eos] if isinstance(eos, int) else list(eos or [])] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def greedy_decodes(model: nn.Module, kind: str, kwargs: Dict[str, Any], steps: int = 4):
    """``steps`` new tokens by generate() with the KV (or SSM state) cache, and by the same greedy
    decode recomputing everything each step: a causal LM from the first 5 input ids, an
    encoder-decoder ("seq2seq") from its decoder start token. Returns (generated, recomputed)."""
    if kind == "causal":
        prompt = kwargs["input_ids"][:, :5]
        generated = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        recomputed = prompt
        with torch.no_grad():
            for step in range(steps):
                logits = model(input_ids=recomputed, use_cache=False).logits
                recomputed = torch.cat([recomputed, _pick(model, logits, step, steps)], 1)
        return generated, recomputed
    assert kind == "seq2seq", f"generate() is checked on causal and seq2seq models, not {kind!r}"
    source = {k: v for k, v in kwargs.items() if not k.startswith("decoder_")}
    start = torch.full((1, 1), model.config.decoder_start_token_id, dtype=torch.long)
    generated = model.generate(**source, decoder_input_ids=start, max_new_tokens=steps, min_new_tokens=steps,
                               do_sample=False)
    recomputed = start
    with torch.no_grad():
        for step in range(steps):
            logits = model(**source, decoder_input_ids=recomputed, use_cache=False).logits
            recomputed = torch.cat([recomputed, _pick(model, logits, step, steps)], 1)
    return generated[:, -steps:], recomputed[:, -steps:]  # Whisper's generate() leaves out the start token


def assert_generate_equals_recompute(model: nn.Module, kind: str, kwargs: Dict[str, Any], steps: int = 4) -> None:
    """generate() with the cache decodes what a full-recompute greedy decode does (`greedy_decodes`)."""
    generated, recomputed = greedy_decodes(model.eval(), kind, kwargs, steps)
    assert torch.equal(generated, recomputed), \
        f"generate() with the cache decoded {generated.tolist()}, a full recompute {recomputed.tolist()}"


def _count_misses(model: nn.Module, planned: Dict[str, int]) -> Dict[str, Any]:
    layers = dict(iter_masked(model))
    now = {name: int(torch.count_nonzero(layers[name].weight_mask)) for name in planned}
    return {name: (now[name], count) for name, count in planned.items() if now[name] != count}


def assert_rigl_keeps_exact_counts(model: nn.Module, case, steps: int = 4, update_interval: int = 2) -> None:
    """``steps`` RigL steps at batch + 2 (a mask update every ``update_interval``, on a squared-output loss):
    every masked layer (each expert's own layers in a mixture of experts) holds exactly its planned
    non-zeros, round(density * numel), before and after, masked weights stay zero, and some mask moved."""
    planned = {name: exact_count(layer.target_density, layer.weight.numel())
               for name, layer in iter_masked(model) if layer.target_density < 1}
    assert planned, "no masked layer below density 1: nothing for RigL to keep"
    for when in ("before", "after"):
        if when == "after":
            before = {name: layer.weight_mask.clone() for name, layer in iter_masked(model)}
            _rigl_steps(model, case, steps, update_interval)
        misses = _count_misses(model, planned)
        assert not misses, f"{when} RigL {len(misses)} masked layers miss their planned count " \
                           f"(name: (non-zeros, planned)), e.g. {dict(list(misses.items())[:3])}"
    layers = dict(iter_masked(model))
    leaked = [name for name, layer in layers.items() if bool(((layer.weight != 0) & ~layer.weight_mask).any())]
    assert not leaked, f"after RigL, weights outside the mask are not zero in {leaked[:3]}"
    assert any(not torch.equal(before[n], layers[n].weight_mask) for n in before), \
        f"{steps} RigL steps moved no mask: the check exercised no update"


def _rigl_steps(model: nn.Module, case, steps: int, update_interval: int) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = RigL(model, optimizer, total_steps=steps, update_interval=update_interval, end_fraction=1.0)
    args, kwargs = grown(case.args), grown(case.kwargs)  # batch norm cannot train on one sample of 1x1 maps
    for _ in range(steps):
        out = tensors(model(*args, **kwargs))
        sum(t.float().pow(2).mean() for t in out if t.is_floating_point()).backward()
        optimizer.step()
        engine.step()
        optimizer.zero_grad()
    model.eval()


def assert_onnx_matches(module: nn.Module, case, path: str, rtol: float = 1e-3, atol_scale: float = 1e-4) -> None:
    """sift.export_onnx writes the module to ``path`` and onnxruntime computes what torch computes."""
    import onnxruntime as ort
    from sift_compiler import export_onnx
    module.eval()
    with torch.no_grad():
        expected = [t.numpy() for t in tensors(module(*case.args, **case.kwargs))]
    info = export_onnx(module, case.args, path, case.kwargs, verify=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {n: t.numpy() for n, t in zip(info.input_names, tensors((case.args, case.kwargs)))}
    assert_allclose_outputs(session.run(None, feed), expected, rtol=rtol, atol_scale=atol_scale)
