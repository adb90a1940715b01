"""Compile on the meta device, materialize where the weights live (issue 11).

A tiny Llama built on meta compiles for every transform to the report a real-weight compile gives
(the meta run adds notes saying which checks needed values), allocates nothing, and, materialized
with the same seed, holds bit for bit the weights and masks of the real-weight compile of a dense
model drawn with ``sift.init_weights``. Under FSDP2 (2 ranks), materializing shard by shard gives
the same tensors as materializing whole.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import sift_compiler as sift
from sift_compiler.testing import assert_masks_exact
from checks import run_script

CONFIG = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=500, max_position_embeddings=64)
IDS = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))


def _llama(device=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device(device or "cpu"):
        return LlamaForCausalLM(LlamaConfig(**CONFIG))


@pytest.mark.parametrize("transform", ["parallel", "factorized", "doped", "wide"])
def test_meta_compile_plans_exactly_what_a_real_compile_builds(transform):
    dense = _llama()
    sift.init_weights(dense, seed=7)
    real = sift.compile(dense, transform, 0.75, (), {"input_ids": IDS}, seed=7)
    planned = sift.compile(_llama("meta"), transform, 0.75, (), {"input_ids": IDS}, seed=7)
    assert planned.output == "native" and type(planned.module) is type(dense)
    assert all(t.is_meta for t in planned.module.state_dict().values())  # nothing was allocated
    real_report, meta_report = real.report.to_dict(), planned.report.to_dict()
    real_notes, meta_notes = real_report.pop("notes"), meta_report.pop("notes")
    assert meta_report == real_report
    extra = [n for n in meta_notes if n not in real_notes]
    assert extra and all(n.startswith("meta device:") for n in extra)
    assert any("not checked against the model's outputs" in n for n in extra)

    model = sift.materialize(planned.module, "cpu", seed=7)
    expected, actual = real.module.state_dict(), model.state_dict()
    assert expected.keys() == actual.keys()
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=IDS).logits, real.module.eval()(input_ids=IDS).logits,
                                   rtol=0, atol=0)
    assert_masks_exact(model)


def _shard_worker(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    planned = sift.compile(_llama("meta"), "wide", 0.75, (), {"input_ids": IDS}, seed=3).module
    for layer in planned.model.layers:
        fully_shard(layer)
    fully_shard(planned)
    planned.to_empty(device="cpu")
    sift.init_weights(planned, seed=3)
    local = planned.model.layers[0].mlp.up_proj.weight_mask
    state = get_model_state_dict(planned, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({"state": state, "local_rows": local.to_local().shape[0], "rows": local.shape[0]},
                   os.path.join(out_dir, "sharded.pt"))
    dist.destroy_process_group()


def test_materialized_shard_by_shard_under_fsdp2_equals_materialized_whole(tmp_path):
    run_script(__file__, str(tmp_path), ranks=2, timeout=300)
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    assert sharded["local_rows"] * 2 == sharded["rows"]  # each rank held half of the mask
    whole = sift.materialize(sift.compile(_llama("meta"), "wide", 0.75, (), {"input_ids": IDS}, seed=3).module,
                             "cpu", seed=3).state_dict()
    assert sharded["state"].keys() == whole.keys()
    assert [k for k in whole if not torch.equal(whole[k], sharded["state"][k])] == []


if __name__ == "__main__":
    _shard_worker(sys.argv[1])
