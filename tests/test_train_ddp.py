"""Two-process DDP (gloo, CPU): GaLoreAdamW keeps parameters identical across ranks for every projection,
and so does Cuttlefish when it switches layers to factors in the middle of training (run through the one
training loop, rankwise.training.train, where the HF Trainer wraps the model in DDP)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import TrainerCallback

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
        results["cuttlefish"] = _cuttlefish(rank)
        results["regimes"] = _regimes()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _cuttlefish(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.errors import RankwiseError
    from rankwise.surgery import LowRankLinear
    from rankwise.train import Cuttlefish

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=1, vocab_size=64))
    out: dict = {}
    try:  # DDP that refuses unused parameters: a one-line error instead of a hang or a silent desync
        Cuttlefish(check_every=1, patience=1, tol=10.0).step_end(DDP(model), 1, None)
    except RankwiseError as exc:
        out["error"] = str(exc)
    # through the one training loop (rankwise.training.train: the Trainer wraps DDP with find_unused_parameters);
    # the Trainer gives each process its own share of every global batch
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    import rankwise.train.callbacks as callbacks
    from rankwise.training import TrainConfig, train

    g = torch.Generator().manual_seed(200)
    rows = [{"input_ids": (x := torch.randint(0, 64, (16,), generator=g)), "labels": x} for _ in range(24)]
    sync = callbacks.sync_new_parameters
    for key, hook in (("synced", sync), ("unsynced", lambda params: None)):  # unsynced: the negative control
        callbacks.sync_new_parameters = hook
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                             num_key_value_heads=2, num_hidden_layers=1, vocab_size=64))
        cb = Cuttlefish(check_every=1, patience=1, tol=10.0)  # every matrix settles at the 2nd check: switch at 2
        at_switch = _AtStep(2)
        train(model, rows, TrainConfig(steps=6, batch_size=2, seed=0), lr=1e-2, callbacks=[cb, at_switch],
              progress=False)
        out[key] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "switched": sorted(n for n, m in model.named_modules() if isinstance(m, LowRankLinear)),
                    "at_switch": at_switch.factors}
    callbacks.sync_new_parameters = sync
    return out


def _regimes() -> dict:
    """Every regime through the one training loop under DDP (the Trainer wraps the regime's model; run after
    _cuttlefish, which set the torchrun environment): ReLoRA merges at steps 2 and 4 inside the run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.train.regimes.base import build_regime
    from rankwise.training import TrainConfig, lm_collate, train

    g = torch.Generator().manual_seed(300)
    rows = [{"input_ids": (x := torch.randint(0, 64, (16,), generator=g)), "labels": x} for _ in range(24)]
    out = {}
    for name in ("sltrain", "relora", "lost"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                             num_key_value_heads=2, num_hidden_layers=1, vocab_size=64))
        regime = build_regime(name, rank=4, sparse_density=0.1, relora_every=2, relora_warmup=1, seed=0)
        regime.prepare(model)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        seen: list[torch.Tensor] = []  # the windows this process trained on

        def collate(batch, seen=seen):
            out = lm_collate(batch)
            seen.append(out["input_ids"].clone())
            return out

        train(model, rows, TrainConfig(steps=5, batch_size=2, seed=0), lr=1e-2, optimizer=opt, collator=collate,
              scheduler=regime.scheduler(opt, 5), callbacks=regime.callbacks(), progress=False)
        out[name] = {"init": init, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                     "batches": torch.cat(seen),
                     "merges": [e["step"] for e in regime.callback.events] if name == "relora" else []}
    return out


class _AtStep(TrainerCallback):
    """Trainer callback keeping a copy of the factors after step ``step`` (run after Cuttlefish's switch)."""

    def __init__(self, step: int) -> None:
        self.step, self.factors = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if state.global_step == self.step:
            self.factors = {n: p.detach().clone() for n, p in model.named_parameters() if ".A." in n or ".B." in n}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(d)), nprocs=2, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_ranks_keep_identical_parameters(ranks) -> None:
    r0, r1 = ranks
    r0 = {k: v for k, v in r0.items() if k not in ("cuttlefish", "regimes")}
    for key in r0:
        assert r0[key]["losses"] != r1[key]["losses"], key  # the ranks really saw different batches
        torch.testing.assert_close(r0[key]["params"], r1[key]["params"], atol=0, rtol=0, msg=key)
    # and training did change the parameters (the comparison is not of two untouched inits)
    assert not torch.equal(r0["svd-False"]["params"], r0["dct-False"]["params"])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_cuttlefish_under_ddp_keeps_processes_identical(ranks) -> None:
    c0, c1 = ranks[0]["cuttlefish"], ranks[1]["cuttlefish"]
    assert "find_unused_parameters=True" in c0["error"] and "\n" not in c0["error"]
    s0, s1 = c0["synced"], c1["synced"]
    assert s0["switched"] and s0["switched"] == s1["switched"]  # layers were factorised, the same on both
    for name, p in s0["params"].items():  # ... and both hold bitwise the same weights, factors included
        assert torch.equal(p, s1["params"][name]), name
    moved = [n for n, p in s0["at_switch"].items() if not torch.equal(p, s0["params"][n])]
    assert moved, "the factors did not train after the switch"
    # negative control: without the factors' gradient averaging the processes (different batches) drift apart
    u0, u1 = c0["unsynced"], c1["unsynced"]
    drift = [n for n, p in u0["params"].items() if not torch.equal(p, u1["params"][n])]
    assert any(".A." in n or ".B." in n for n in drift), drift


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("regime", ["sltrain", "relora", "lost"])
def test_regimes_under_ddp_keep_processes_identical(ranks, regime) -> None:
    """SLTrain's sparse values, ReLoRA's merges (frozen W changed outside autograd, factors restarted, moments pruned)
    and LOST's split all stay bitwise identical on two processes that saw different batches."""
    a, b = ranks[0]["regimes"][regime], ranks[1]["regimes"][regime]
    assert a["batches"].shape == b["batches"].shape and not torch.equal(a["batches"], b["batches"])  # own shares
    assert set(a["params"]) == set(b["params"])
    for name, p in a["params"].items():
        assert torch.equal(p, b["params"][name]), name
    moved = [n for n, p in a["params"].items() if not torch.equal(p, a["init"][n])]
    assert moved, "training did not change the weights"
    if regime == "relora":
        assert a["merges"] == b["merges"] == [2, 4]
        frozen = [n for n in a["params"] if n.endswith("proj.weight")]  # ReLoRALinear's frozen W: merged into
        assert frozen and all(not torch.equal(a["params"][n], a["init"][n]) for n in frozen)
