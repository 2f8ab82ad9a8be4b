"""``dqt.comm.collective.exchange``, the two phases' transport: on gloo, point-to-point sends
and receives posted together must deliver exactly what gloo's ``all_to_all_single`` and
``all_gather`` deliver — the same bytes in the same rank order — on the whole world and on a
subgroup whose ranks are not the global ones (peers are group ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dqt.comm.collective import _all_gather_single, exchange
from tests.conftest import rank_process

WORLD = 3


def _payload(rank: int, n: int, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * salt + rank)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@rank_process
def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    sub = dist.new_group([0, 2])  # rank 2 is group rank 1
    results = {}
    for name, group in (("world", dist.group.WORLD), ("sub", sub)):
        if group == dist.GroupMember.NON_GROUP_MEMBER:
            continue
        n = dist.get_world_size(group)
        for c in (1, 4097):  # bytes per chunk: one, and an odd size over a page
            a2a_in = _payload(rank, n * c, c)
            mine, want = torch.empty(n * c, dtype=torch.uint8), torch.empty(n * c, dtype=torch.uint8)
            exchange("all_to_all", mine, a2a_in, group)
            dist.all_to_all_single(want, a2a_in, group=group)
            results[(name, "all_to_all", c)] = (mine, want)
            ag_in = _payload(rank, c, c + 1)
            mine, want = torch.empty(n * c, dtype=torch.uint8), torch.empty(n * c, dtype=torch.uint8)
            exchange("all_gather", mine, ag_in, group)
            _all_gather_single(want, ag_in, group=group)
            results[(name, "all_gather", c)] = (mine, want)
    torch.save(results, f"{out}/rank{rank}.pt")


def test_exchange_delivers_what_the_gloo_collectives_deliver(tmp_path):
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert len(ranks[0]) == 8 and len(ranks[1]) == 4 and len(ranks[2]) == 8
    for r, res in enumerate(ranks):
        for key, (mine, want) in res.items():
            assert torch.equal(mine, want), (r, key)
    # and what arrived is the senders' data: rank 2's all_gather on the subgroup holds rank 0's
    c = 4097
    assert torch.equal(ranks[2][("sub", "all_gather", c)][0][:c], _payload(0, c, c + 1))
    # all_to_all on the world: rank 1 holds chunk 1 of every rank, in rank order
    got = ranks[1][("world", "all_to_all", c)][0].view(WORLD, c)
    for p in range(WORLD):
        assert torch.equal(got[p], _payload(p, WORLD * c, c)[c:2 * c])
