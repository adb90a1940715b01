"""Attention as written in 2026 and encoder-decoders (issue 16), on tiny configs (tests/families.py).

Each case compiles with ``strict=True`` (applied as asked, or the test fails with the reason) and
checks: the result is the model's own class; iso-FLOP within the rounding bound (VerifyPass) and
0.5%; exact mask counts; native == graph form at a batch the compiler did not check; for causal
and seq2seq models, ``generate()`` with the KV cache decodes what a full recompute decodes.

The split (time budget of make test): Sparse Wide, the transform that has to keep every split
consistent, runs at 0.5 and 0.9 on the families with the hardest attention (DeepSeek-V3's latent
attention, Phi-3's fused qkv with partial rotary, T5); every other family runs one transform at
one sparsity, chosen so that each transform and each of 0.5 / 0.9 appears (GPT-NeoX's partial
rotary and Whisper's other transforms: the support matrix). The whole matrix
(every family x transform at 0.5 and 0.9, ONNX included) is ``benchmarks/support_matrix.py``
(docs/support.md); ``test_support_matrix_script`` runs it on a subset.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import sift_compiler as sift
from sift_compiler.testing import assert_masks_exact
from checks import (assert_generate_equals_recompute, assert_iso_flop, assert_native_equals_graph,
                    assert_rigl_keeps_exact_counts, exit_status, run_script)
from families import FAMILIES

CASES = [
    ("deepseek_v3", "wide", 0.5),  # and 0.9 in test_latent_attention_keeps_its_splits_and_widens_its_ranks
    ("phi3", "wide", 0.5), ("phi3", "wide", 0.9),
    ("t5", "wide", 0.5), ("t5", "wide", 0.9),
    ("qwen3", "parallel", 0.9), ("olmo2", "wide", 0.5), ("gemma2", "doped", 0.9),
    ("gemma3", "wide", 0.9), ("stablelm", "factorized", 0.5),
    ("bart", "parallel", 0.5), ("whisper", "wide", 0.5),
]


@pytest.mark.parametrize("name, transform, sparsity", CASES, ids=[f"{n}-{t}-s{s}" for n, t, s in CASES])
def test_family_compiles_as_asked(name, transform, sparsity):
    family = FAMILIES[name]
    case = family.build()
    result = sift.compile(case.model, transform, sparsity, case.args, case.kwargs, strict=True)
    module = result.module
    assert result.output == "native" and type(module) is type(case.model), result.report.notes
    assert abs(result.report.flop_ratio - 1) <= 0.005, result.report.table()
    assert_iso_flop(result)
    assert_masks_exact(module)
    assert_native_equals_graph(result, case)
    assert_generate_equals_recompute(module, family.kind, case.kwargs)


def test_latent_attention_keeps_its_splits_and_widens_its_ranks():
    """DeepSeek-V3 under Sparse Wide: the low-rank latents (q_lora_rank, kv_lora_rank) widen, the
    heads' RoPE and no-RoPE parts keep their sizes (attention width kept), and the attention module's
    own kv_lora_rank follows the widened latent; a few RigL steps keep exact per-layer counts."""
    case = FAMILIES["deepseek_v3"].build()
    result = sift.compile(case.model, "wide", 0.9, case.args, case.kwargs, strict=True)
    attention = result.module.model.layers[0].self_attn
    assert attention.kv_a_layernorm.weight.shape[0] == attention.kv_lora_rank > 20
    assert attention.q_a_proj.out_features == attention.q_b_proj.in_features > 40
    assert (attention.qk_nope_head_dim, attention.qk_rope_head_dim, attention.v_head_dim) == (16, 8, 12)
    assert attention.kv_a_proj_with_mqa.out_features == attention.kv_lora_rank + 8
    assert_rigl_keeps_exact_counts(result.module, case)


def test_support_matrix_script(tmp_path):
    """The support matrix's script on a 2018 causal LM (Sparse Wide, 0.5 and 0.9) and, merged in by
    ``--update``, an encoder-decoder (Parallel, 0.5): each row runs in its own child with every check
    (native=graph, generate, RigL counts, ONNX), the markdown and JSON have their format, and these
    known-good rows say full and pass each check; an unknown transform is exit 2."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "support_matrix.py")
    run_script(script, "--families", "gpt2", "--transforms", "wide", "--sparsities", "0.5,0.9",
               "--out-dir", str(tmp_path), timeout=900)
    run_script(script, "--families", "t5", "--transforms", "parallel", "--sparsities", "0.5",
               "--out-dir", str(tmp_path), "--update", timeout=900)
    raw = json.loads((tmp_path / "support_matrix.json").read_text())
    rows = raw["rows"]
    assert raw["sparsities"] == [0.5, 0.9] and len(raw["updates"]) == 1, raw["updates"]
    assert [(r["family"], r["transform"], r["status"]) for r in rows] == \
        [("gpt2", "wide", "full"), ("t5", "parallel", "full")], rows
    assert [c["sparsity"] for r in rows for c in r["cells"]] == [0.5, 0.9, 0.5]
    for cell in (c for r in rows for c in r["cells"]):
        assert cell["form"] == "native" and abs(cell["flop_ratio"] - 1) <= 0.005, cell
        assert cell["checks"] == {"iso_flop": True, "native_graph": True, "generate": True, "rigl": True}, cell
    assert [c.get("onnx") for r in rows for c in r["cells"]] == [True, None, True]
    text = (tmp_path / "support.md").read_text()
    assert text.startswith("# Support matrix\n") and "Totals: 2 full." in text and "rows updated by `" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| family | transform | status | ratio s=0.5 | ratio s=0.9 | form | native=graph | " \
                       "generate | RigL counts | ONNX | reason |"
    assert table[1] == "| gpt2 | wide | full | 1.0000 | 1.0000 | native | yes | yes | yes | yes |  |"
    assert table[2] == "| t5 | parallel | full | 1.0000 | - | native | yes | yes | yes | yes |  |"
    assert len(table) == 3


def test_support_matrix_refuses_unknown_names_in_one_line(capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "support_matrix.py")
    spec = importlib.util.spec_from_file_location("support_matrix", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert exit_status(script.main, ["--transforms", "wide,sparse_wide"]) == 2
    assert capsys.readouterr().err == ("support_matrix.py: unknown transform sparse_wide; "
                                       "known: wide, parallel, factorized, doped\n")
    assert exit_status(script.main, ["--families", "gpt3"]) == 2
    assert capsys.readouterr().err.startswith("support_matrix.py: unknown family gpt3; known: resnet18, vit, gpt2")
