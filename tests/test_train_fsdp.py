"""GaLoreAdamW under FSDP2 (fully_shard, 2 gloo processes on CPU) equals GaLoreAdamW under DDP.

FSDP hands the optimizer row shards of every gradient; the projection comes from the all-reduced Gram
matrix (right side), the sharded range finder or DCT scores, or a refresh-time gather (left side), and
the Adam moments stay sharded. DDP hands it the whole averaged gradient. Same data, same seeds: the
parameters after several steps with projection refreshes must agree to float tolerance.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VARIANTS = [("svd", False), ("randomized", True), ("dct", False)]  # Fira on the sharded range finder
STEPS = 5  # refreshes at steps 0, 2, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same init on every process
    # k/v (16×32) and down (32×75) project on the left, the others on the right; 75 rows (gate/up) and
    # 75 columns (down) and the 65-row embedding split unevenly over 2 processes
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=75, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=1, vocab_size=65))


def _run(model, opt, rank: int) -> list[float]:
    g = torch.Generator().manual_seed(100 + rank)  # different data on each process
    losses = []
    for _ in range(STEPS):
        x = torch.randint(0, 65, (2, 12), generator=g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rankwise.train import GaLoreAdamW, galore_param_groups
    from rankwise.train.memory import optimizer_state_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for projection, fira in VARIANTS:
            kw = {"rank": 4, "update_proj_gap": 2, "projection": projection, "fira": fira}
            ref = _model()
            opt_ref = GaLoreAdamW(galore_param_groups(ref, **kw), lr=1e-2, weight_decay=0.01, canonical_signs=True)
            ddp_losses = _run(DDP(ref), opt_ref, rank)
            model = _model()
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            opt = GaLoreAdamW(galore_param_groups(model, **kw), lr=1e-2, weight_decay=0.01)
            fsdp_losses = _run(model, opt, rank)
            full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            results[f"{projection}-{fira}"] = {
                "ddp": {n: p.detach().clone() for n, p in ref.named_parameters()},
                "fsdp": full,
                "losses": (ddp_losses, fsdp_losses),
                "state_bytes": (optimizer_state_bytes(opt_ref).total, optimizer_state_bytes(opt).total),
                "n_projected": optimizer_state_bytes(opt).projected_params,
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp_equals_ddp(tmp_path) -> None:
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    init = dict(_model().named_parameters())
    for key, res in r0.items():
        for name, ref in res["ddp"].items():
            torch.testing.assert_close(res["fsdp"][name], ref, atol=2e-5, rtol=1e-4, msg=f"{key}: {name}")
            torch.testing.assert_close(r1[key]["fsdp"][name], ref, atol=2e-5, rtol=1e-4, msg=f"{key}: {name}")
        moved = max(float((res["ddp"][n] - p.detach()).abs().max()) for n, p in init.items())
        assert moved > 1e-3, key  # training did move the weights
        ddp_losses, fsdp_losses = res["losses"]
        assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-4, abs=1e-5), key
        # every process keeps about half of the optimizer state (moments sharded with the parameters)
        ddp_bytes, fsdp_bytes = res["state_bytes"]
        assert fsdp_bytes < 0.6 * ddp_bytes, (key, fsdp_bytes, ddp_bytes)
        if not key.startswith("dct"):
            # nothing is replicated: the two processes' resident state adds up to one process's (bases included;
            # Fira adds one replicated float32 norm per projected matrix)
            allowance = 4 * res["n_projected"] if key.endswith("True") else 0
            both = fsdp_bytes + r1[key]["state_bytes"][1]
            assert ddp_bytes <= both <= ddp_bytes + allowance, (key, both, ddp_bytes)


def test_train_cli_under_torchrun_fsdp(tmp_path, capsys) -> None:
    """``torchrun --nproc-per-node 2 -m rankwise train --fsdp``: half the optimizer state per process, one writer."""
    import json
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rankwise.cli.main import main
    from rankwise.io.texts import load_text

    text = load_text("ptb", "train")[:20_000]
    vocab = {"<unk>": 0, "<s>": 1}
    for w in text.split():
        if w not in vocab and len(vocab) < 200:
            vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")
    torch.manual_seed(0)
    folder = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 num_hidden_layers=2, vocab_size=200, bos_token_id=1, eos_token_id=1)
                     ).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (tmp_path / "train.txt").write_text(text)
    # one projection (gap 10 > 3 steps): a later refresh may pick other signs in one process than under FSDP
    args = ["train", str(folder), "--data", str(tmp_path / "train.txt"), "--steps", "3", "--seq-len", "32",
            "--rank", "4", "--update-gap", "10", "--eval-tokens", "64", "--eval-seq-len", "32", "--no-progress"]
    assert main([*args, "--batch-size", "4", "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "rankwise", *args, "--batch-size", "2", "--fsdp"]
    ck = tmp_path / "ck"
    proc = subprocess.run([*torchrun, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json"),
                           "--checkpoints", str(ck), "--save-steps", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["processes"] == 2 and two["parallel"] == "fsdp" and two["steps"] == 3
    # the same global batches (2 processes × 2 windows = 1 process × 4): the same loss curve up to float order
    assert two["train"]["losses"] != one["train"]["losses"]  # each process reports its own half-batch ...
    assert abs(two["final_loss"] - one["final_loss"]) < 1e-3 * one["final_loss"]  # ... their mean is the same
    assert two["optimizer_state_bytes_per_rank"] < 0.6 * one["optimizer_state_bytes_per_rank"]
    assert two["parameters"] == one["parameters"]
    assert two["perplexity"]["perplexity"] == pytest.approx(one["perplexity"]["perplexity"], rel=1e-3)
    assert (tmp_path / "two" / "config.json").is_file()

    # --fsdp checkpoints: the gathered weights as an ordinary folder, one optimizer file per process; resuming from
    # step 2 with 2 processes ends where the uninterrupted run did
    from safetensors.torch import load_file

    step2 = ck / "checkpoint-2"
    assert sorted(p.name for p in step2.glob("optimizer-rank*")) == ["optimizer-rank0-of-2.pt",
                                                                       "optimizer-rank1-of-2.pt"]
    assert LlamaForCausalLM.from_pretrained(str(step2)).config.hidden_size == 32
    proc = subprocess.run([*torchrun, "--out", str(tmp_path / "resumed"), "--json", str(tmp_path / "resumed.json"),
                           "--resume", str(step2)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert len(resumed["train"]["step_seconds"]) == 1  # only step 3 ran; steps 1-2 are the checkpoint's log history
    assert resumed["train"]["losses"] == pytest.approx(two["train"]["losses"], rel=1e-5)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("two", "resumed"))
    init = load_file(str(step2 / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # step 3 changed the weights after the checkpoint
    # an --fsdp checkpoint cannot be resumed by a run that is not sharded (its optimizer state is per process)
    capsys.readouterr()
    rc = main([*args, "--batch-size", "4", "--out", str(tmp_path / "bad"), "--resume", str(step2)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 2 and not (tmp_path / "bad").exists()
    assert len(err) == 1 and "torchrun --nproc-per-node 2 -m rankwise train --fsdp" in err[0], err


def test_fsdp_optimizer_checkpoint_refuses_another_world_size(tmp_path) -> None:
    from rankwise.errors import RankwiseError
    from rankwise.train.fsdp_checkpoint import load_optimizer_shard, save_optimizer_shard

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p])
    for rank in range(2):
        save_optimizer_shard(opt, tmp_path, rank, 2)
    load_optimizer_shard(opt, tmp_path, 1, 2)
    with pytest.raises(RankwiseError, match="sharded over 2 processes, this run has 4; resume with torchrun "
                                            "--nproc-per-node 2"):
        load_optimizer_shard(opt, tmp_path, 0, 4)
    (tmp_path / "optimizer-rank1-of-2.pt").unlink()
    with pytest.raises(RankwiseError, match="optimizer-rank1-of-2.pt is missing"):
        load_optimizer_shard(opt, tmp_path, 1, 2)
