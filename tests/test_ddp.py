"""DistributedDataParallel: 2 CPU processes (torchrun, gloo) keep identical masks after every update.

The test launches this file with torchrun; each rank trains the same compiled model on its own
data with RigL and with SET, records a digest of its masks and weights after every step, and
counts Python-level collectives issued during training: RigL's dense gradients (kept out of
``weight.grad``, so that clipping sees the sparse gradient) take one all-reduce per mask update,
SET needs none. Ranks also get
different global RNG states, so an engine that drew SET positions from the global RNG, or grew
from a rank-local gradient, would diverge and fail the comparison.
"""
import hashlib
import json
import os
import sys

import torch
from checks import run_script

STEPS, INTERVAL = 12, 3
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "all_gather_into_tensor",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "gather", "scatter", "barrier", "send", "recv", "isend", "irecv")


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _count_collectives(counter):
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    for name in COLLECTIVES:
        for mod in (dist, c10d):
            original = getattr(mod, name, None)
            if original is None:
                continue

            def counted(*args, __original=original, __name=name, **kwargs):
                counter[__name] = counter.get(__name, 0) + 1
                return __original(*args, **kwargs)
            setattr(mod, name, counted)


def _worker(out_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sift_compiler as sift
    from test_sparsity_common import batches, compiled

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {"rank": rank}
    counter = {}
    for method in ("rigl", "set"):
        module = compiled()
        model = DDP(module, broadcast_buffers=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        cls = {"rigl": sift.sparsity.RigL, "set": sift.sparsity.SET}[method]
        engine = cls(model, opt, total_steps=STEPS, update_interval=INTERVAL, seed=3)
        torch.manual_seed(1000 + rank)                      # ranks' global RNGs differ on purpose
        _count_collectives(counter) if method == "rigl" else None
        steps = []
        for x, y in batches(STEPS, seed=100 + rank):         # each rank its own data
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            changed = engine.step()
            opt.zero_grad()
            masks = list(engine.masks().values())
            steps.append({"loss": float(loss), "changed": changed, "masks": _digest(masks),
                          "weights": _digest([w.param for w in engine.weights]),
                          "exact": all(int(w.layer.weight_mask.sum()) == w.count and
                                       not bool(w.param[~w.layer.weight_mask].any()) for w in engine.weights)})
        report[method] = steps
    report["collectives"] = {k: v for k, v in counter.items()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def test_ddp_two_processes_keep_identical_masks(tmp_path):
    run_script(__file__, str(tmp_path), ranks=2, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for method in ("rigl", "set"):
        a, b = ranks[0][method], ranks[1][method]
        assert [s["changed"] for s in a] == [(i + 1) in (3, 6) for i in range(STEPS)]  # updates before 0.75 * 12
        assert all(s["exact"] for s in a + b)
        assert [s["loss"] for s in a] != [s["loss"] for s in b]        # the ranks really saw different data
        assert [s["masks"] for s in a] == [s["masks"] for s in b], method
        assert [s["weights"] for s in a] == [s["weights"] for s in b], method
        assert len({s["masks"] for s in a}) == 3                     # initial masks and two updates
    # two RigL updates, one all-reduce each; SET communicates nothing of its own
    assert ranks[0]["collectives"] == {"all_reduce": 2} and ranks[1]["collectives"] == {"all_reduce": 2}


if __name__ == "__main__":
    _worker(sys.argv[1])
