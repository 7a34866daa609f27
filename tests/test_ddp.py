"""DistributedDataParallel with gloo on this machine: two processes built with different seeds keep
the same random features at every step, across redraws, and produce the same outputs."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import performer

WORLD, STEPS, D = 2, 5, 16


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        # Different seeds on each rank: different initial weights and features, and module generators
        # that would draw different features at every redraw.
        torch.manual_seed(rank)
        model = nn.Sequential(
            performer.convert(nn.TransformerEncoderLayer(D, 4, dim_feedforward=32, dropout=0.0, batch_first=True),
                              num_features=8, feature_redraw_interval=2),
            nn.Linear(D, 1))
        attention = model[0].self_attn
        # forward_sync_buffers=False: DDP syncs the buffers once, at construction; every later
        # agreement comes from the modules' own broadcast after each redraw.
        ddp = DistributedDataParallel(model, forward_sync_buffers=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        features = [attention.features.clone()]
        for step in range(STEPS):
            data = torch.Generator().manual_seed(100 * rank + step)  # each rank its own batches
            x = torch.randn(3, 6, D, generator=data)
            loss = ddp(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            features.append(attention.features.clone())
        attention.redraw_features()  # by hand, on every rank
        features.append(attention.features.clone())
        probe = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            out = model.eval()(probe)
        torch.save({"features": features, "out": out}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ranks_share_features_and_outputs_across_redraws(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    features = [r["features"] for r in results]
    for step, (a, b) in enumerate(zip(*features)):
        assert torch.equal(a, b), f"ranks hold different features after step {step}"
    changed = [not torch.equal(a, b) for a, b in zip(features[0], features[0][1:])]
    # redraws before training forwards 3 and 5 (interval 2), then by hand
    assert changed == [False, False, True, False, True, True]
    torch.testing.assert_close(results[0]["out"], results[1]["out"], atol=0, rtol=0)
