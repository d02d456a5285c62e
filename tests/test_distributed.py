"""Data parallelism: 2 CPU processes (gloo) train 2 DDP steps and validate; every rank must end with the same
weights (raw, EMA, vq codebook buffers) and the logged vocabulary usage must count both ranks' images.

The ranks are separate processes started the way torchrun or srun starts them (see
v2flow/eval/reliability.py): no pickling of the test's objects, no fork of the pytest process, and a
failing rank cannot leave the other hanging in a collective.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from v2flow.eval.reliability import ddp_check
from v2flow.training import ReplicaCheck, weight_checksums


def test_checksums_see_one_changed_element():
    layer = nn.Linear(4, 3)
    names, before = weight_checksums(layer)
    assert names == ["weight", "bias"] and before.dtype == torch.int64
    with torch.no_grad():
        layer.weight[1, 2] = torch.nextafter(layer.weight[1, 2], torch.tensor(1.0))  # one ulp
    assert (weight_checksums(layer)[1] != before).tolist() == [True, False]


class _TwoRanks(nn.Linear):
    """A module whose all_gather pretends rank 1 holds a different bias."""

    device = torch.device("cpu")

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        other = x.clone()
        other[-1] += 1
        return torch.stack([x, other])


def test_replica_check_names_step_and_tensor():
    check = ReplicaCheck(every_n_steps=2)
    trainer = SimpleNamespace(world_size=2, callbacks=[], global_step=4)
    with pytest.raises(RuntimeError, match=r"after step 4 .*1 of 2 tensors differ.*: bias"):
        check.on_train_batch_end(trainer, _TwoRanks(2, 2), None, None, 0)
    check.on_train_batch_end(SimpleNamespace(world_size=1, callbacks=[], global_step=6), nn.Linear(2, 2), None, None, 0)
    with pytest.raises(ValueError, match="every_n_steps"):
        ReplicaCheck(every_n_steps=-1)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_agree(tmp_path):
    result = ddp_check(tmp_path, world_size=2, steps=2, timeout=150)
    assert result["world_size"] == 2
    assert result["ranks_agree"] and result["max_abs_weight_diff"] == 0.0
    assert result["val_counts_global"] and result["val_metrics_agree"]
    for quantizer, r in result["per_quantizer"].items():
        assert r["val_tokens_per_rank"] == [16, 16], f"{quantizer}: each rank validates its half of 8 images"
        assert r["logged_usage"]["val/distinct_ids"] == r["usage_of_all_ranks"]["val/distinct_ids"]
        assert r["usage_of_all_ranks"] != r["usage_of_rank0_only"], "the data must tell global from rank-0 usage"
        assert sorted(r["losses_rank0"]) == [1, 2]
