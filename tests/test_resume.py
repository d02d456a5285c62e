"""Exact resume: the training order is seeded by (seed, epoch), its position is saved in Lightning checkpoints,
and a run resumed mid-epoch continues bit-exactly like an uninterrupted one."""

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from v2flow.data import ResumableDataLoader, ResumableSampler
from v2flow.eval.reliability import resume_check


def _epoch(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch[0]]


def test_sampler_shards_one_permutation_per_epoch():
    data = TensorDataset(torch.arange(10))
    shards = [ResumableSampler(data, seed=3, num_replicas=2, rank=r) for r in range(2)]
    assert isinstance(shards[0], DistributedSampler), "Lightning must keep it instead of injecting its own"
    assert sorted(list(shards[0]) + list(shards[1])) == list(range(10)), "the ranks split one permutation"
    first = list(shards[0])
    shards[0].set_epoch(1)
    assert list(shards[0]) != first, "every epoch has its own order"
    assert list(ResumableSampler(data, seed=3)) != list(ResumableSampler(data, seed=4))
    assert len(ResumableSampler(data)) == 10 and ResumableSampler(data).num_replicas == 1, "no process group"


def test_loader_state_continues_the_epoch():
    data = TensorDataset(torch.arange(20))
    loader = ResumableDataLoader(data, 4, sampler=ResumableSampler(data, seed=0), drop_last=True)
    loader.sampler.set_epoch(2)
    full = _epoch(loader)
    it = iter(loader)
    seen = [int(i) for _ in range(2) for i in next(it)[0]]
    state = loader.state_dict()
    assert state == {"epoch": 2, "samples": 8, "num_replicas": 1}
    fresh = ResumableDataLoader(data, 4, sampler=ResumableSampler(data, seed=0), drop_last=True)
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(2)  # Lightning sets the restored epoch before iterating
    rest = _epoch(fresh)
    assert seen + rest == full and len(fresh) == 5, "len() stays the full epoch: Lightning counts from the position"
    assert _epoch(fresh) == full, "the offset applies to the resumed epoch only"
    finished = ResumableDataLoader(data, 4, sampler=ResumableSampler(data, seed=0), drop_last=True)
    finished.load_state_dict({"epoch": 2, "samples": 20, "num_replicas": 1})
    finished.sampler.set_epoch(3)
    assert len(_epoch(finished)) == 20, "a finished epoch is not resumed into the next one"


def test_loader_state_across_world_sizes():
    data = TensorDataset(torch.arange(16))
    full = list(ResumableSampler(data, seed=0))
    # two ranks consumed 4 samples each: the first 8 positions of the shared permutation
    one = ResumableDataLoader(data, 2, sampler=ResumableSampler(data, seed=0, num_replicas=1, rank=0))
    one.load_state_dict({"epoch": 0, "samples": 4, "num_replicas": 2})
    assert _epoch(one) == full[8:]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # stop after step 4 of a 12-batch epoch
        {"train_size": 24, "num_workers": 1},  # 6-batch epochs: the resumed run enters a reseeded epoch; workers
        {"train_size": 24, "stop_at": 6},  # stopped exactly at an epoch's end
    ],
)
def test_resume_mid_epoch_is_bit_exact(tmp_path, kwargs):
    result = resume_check(tmp_path, **kwargs)
    stop = kwargs.get("stop_at", 4)
    assert result["steps_compared"] == list(range(stop + 1, 9))
    assert result["max_abs_loss_diff"] == 0.0
    assert result["weights_equal"] and result["ema_equal"] and result["bit_exact"]
    ckpt = torch.load(tmp_path / "ckpt" / "stop.ckpt", weights_only=False)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "samples": stop * 4, "num_replicas": 1}
    ], "Lightning must save the loader's position"
