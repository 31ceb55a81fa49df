"""`gather_shards` puts every rank's share of a dataset's features back in dataset order (a fast stand-in for
the slow two-process DDP test: a fake strategy plays the other ranks' all-gather)."""

from types import SimpleNamespace

import pytest
import torch

from ad_lightning.data.base import gather_shards
from ad_lightning.features.cache import Shard


def fake_strategy(world: int, rank: int, parts: list[torch.Tensor]):
    """Rank `rank`'s strategy: `all_gather(tensor)` stacks what every rank sends, [world, n_max, ...], as
    Lightning's does: this rank's `tensor`, and the other ranks' shards (`parts`) zero-padded to the longest."""
    n_max = max(len(p) for p in parts)

    def all_gather(tensor: torch.Tensor) -> torch.Tensor:
        assert tensor.shape[0] == n_max  # every rank sends the same shape
        sent = [torch.cat([p, p.new_zeros(n_max - len(p), *p.shape[1:])]) for p in parts]
        sent[rank] = tensor
        return torch.stack(sent)

    return SimpleNamespace(world_size=world, root_device=torch.device("cpu"), all_gather=all_gather)


@pytest.mark.parametrize(("total", "world"), [(5, 2), (6, 2), (7, 3), (2, 2)])
def test_every_rank_ends_with_the_whole_dataset_in_order(total, world):
    dataset = [{"features": torch.full((2, 1, 1), float(i))} for i in range(total)]  # item i holds the value i
    parts = [torch.stack([item["features"] for item in Shard(dataset, rank, world)]) for rank in range(world)]
    for rank in range(world):
        gathered = gather_shards(parts[rank], total, fake_strategy(world, rank, parts))
        assert gathered.shape == (total, 2, 1, 1)
        assert gathered[:, 0, 0, 0].tolist() == [float(i) for i in range(total)], rank
