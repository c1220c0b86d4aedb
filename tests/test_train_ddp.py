"""Two-process DDP (gloo, CPU): GaLoreAdamW keeps parameters identical across ranks for every projection."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VARIANTS = [("svd", False), ("randomized", False), ("dct", False), ("svd", True)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.train import GaLoreAdamW, galore_param_groups

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for projection, fira in VARIANTS:
            torch.manual_seed(0)  # same init on every rank
            model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                 num_key_value_heads=2, num_hidden_layers=1, vocab_size=64))
            groups = galore_param_groups(model, rank=4, update_proj_gap=2, projection=projection, fira=fira)
            opt = GaLoreAdamW(groups, lr=1e-2)
            ddp = DDP(model)
            g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
            losses = []
            for _ in range(5):  # refreshes at steps 0, 2, 4
                x = torch.randint(0, 64, (2, 16), generator=g)
                loss = ddp(input_ids=x, labels=x).loss
                loss.backward()  # DDP all-reduces the gradients here, before step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            results[f"{projection}-{fira}"] = {"params": flat, "losses": losses}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_ranks_keep_identical_parameters(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    for key in r0:
        assert r0[key]["losses"] != r1[key]["losses"], key  # the ranks really saw different batches
        torch.testing.assert_close(r0[key]["params"], r1[key]["params"], atol=0, rtol=0, msg=key)
    # and training did change the parameters (the comparison is not of two untouched inits)
    assert not torch.equal(r0["svd-False"]["params"], r0["dct-False"]["params"])
