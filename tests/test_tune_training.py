"""Training with adapters through the HF Trainer: the loss goes down for every method, checkpoints hold the
adapter only and resume exactly, the CLI runs end to end."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from rankwise.errors import RankwiseError
from rankwise.training import TrainConfig, train
from rankwise.tune import METHODS, AdapterConfig, adapter_layers, apply, trainable_parameters
from rankwise.tune.peft_backend import loftq_missing
from test_tune_adapters import base_for, tiny_llama

LR = {"svfit": 3e-2, "loldu": 3e-2, "lora-xs": 3e-2, "adalora": 3e-2}
LOFTQ_OK = not loftq_missing()  # LoftQ: bitsandbytes (PEFT's own path on CUDA/XPU, rankwise's elsewhere)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(n: int = 4, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": r, "labels": r} for r in ids]


def _loss(model, rows) -> float:
    ids = torch.stack([r["input_ids"] for r in rows])
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("method", METHODS)
def test_few_steps_lower_the_loss(method):
    if method == "loftq" and not LOFTQ_OK:
        pytest.skip("loftq needs bitsandbytes")
    rows = _rows()  # one batch of 4, seen every step: a few steps must lower its loss
    model = apply(base_for(method), AdapterConfig(method=method, rank=4, total_steps=12),
                  data=[{k: torch.stack([r[k] for r in rows]) for k in rows[0]}], progress=False)
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    before = _loss(model, rows)
    res = train(model, rows, TrainConfig(steps=12, batch_size=4), lr=LR.get(method, 1e-2), progress=False)
    after = _loss(model, rows)
    assert res.steps == 12 and len(res.losses) == 12
    assert after < before - 0.02, (before, after)
    for k, v in model.named_parameters():  # frozen weights did not move
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_checkpoint_holds_adapter_only_and_resume_is_exact(method, tmp_path):
    """A Trainer checkpoint of an adapter run holds the adapter (not the model); resuming from it gives the
    same per-step losses as the uninterrupted run (data order, optimizer, scheduler and RNG restored)."""
    rows = _rows(16)
    cfg = dict(steps=6, batch_size=2, grad_accum=2)
    full = train(apply(tiny_llama(), AdapterConfig(method=method, rank=4), progress=False), rows,
                 TrainConfig(**cfg, checkpoints=str(tmp_path / "a"), save_steps=3), lr=1e-2, progress=False)
    ck = tmp_path / "a" / "checkpoint-3"
    files = set(os.listdir(ck))
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
    weights = [f for f in files if f.endswith(".safetensors")]
    assert weights == (["adapter.safetensors"] if method == "lora" else ["adapter_model.safetensors"])
    from safetensors import safe_open

    with safe_open(str(ck / weights[0]), framework="pt") as h:
        keys = list(h.keys())
        n_saved = sum(math.prod(h.get_slice(k).get_shape()) for k in keys)
    assert keys and all("lora" in k for k in keys)
    assert n_saved == trainable_parameters(apply(tiny_llama(), AdapterConfig(method=method, rank=4),
                                                 progress=False))
    model = tiny_llama()
    assert os.path.getsize(ck / weights[0]) < 0.2 * sum(p.numel() * 4 for p in model.parameters())
    # resume on a model whose adapter starts elsewhere (another seed): the checkpoint must overwrite it
    other = apply(model, AdapterConfig(method=method, rank=4, seed=7), progress=False)
    resumed = train(other, rows, TrainConfig(**cfg, checkpoints=str(tmp_path / "b"), resume=str(ck)), lr=1e-2,
                    progress=False)
    assert resumed.steps == 6 and len(resumed.losses) == 6
    assert max(abs(a - b) for a, b in zip(resumed.losses[3:], full.losses[3:])) < 1e-5


def test_resume_errors(tmp_path):
    with pytest.raises(RankwiseError, match="--save-steps needs --checkpoints"):
        TrainConfig(save_steps=2)
    model = apply(tiny_llama(), AdapterConfig(method="lora", rank=2), progress=False)
    with pytest.raises(RankwiseError, match="no such checkpoint"):
        train(model, _rows(), TrainConfig(steps=1, resume=str(tmp_path / "none")), lr=1e-3, progress=False)


def test_schedule_and_given_optimizer(tmp_path):
    """lr_schedule picks the Trainer's schedule; a given optimizer/scheduler pair is the one the Trainer steps."""
    with pytest.raises(RankwiseError, match="--lr-schedule must be one of linear, constant, cosine"):
        TrainConfig(lr_schedule="jagged")
    model = apply(tiny_llama(), AdapterConfig(method="lora", rank=2), progress=False)
    with pytest.raises(RankwiseError, match="a scheduler needs its optimizer"):
        train(model, _rows(), TrainConfig(steps=1), lr=1e-3, scheduler=object(), progress=False)
    from transformers import TrainerCallback

    class LRs(TrainerCallback):
        def __init__(self):
            self.lrs = []

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    seen = {}
    for schedule in ("constant", "linear"):
        cb = LRs()
        train(apply(tiny_llama(), AdapterConfig(method="lora", rank=2), progress=False), _rows(),
              TrainConfig(steps=4, batch_size=2, lr_schedule=schedule), lr=1e-3, callbacks=[cb], progress=False)
        seen[schedule] = cb.lrs
    assert seen["constant"] == [1e-3] * 4
    assert seen["linear"] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    model = apply(tiny_llama(), AdapterConfig(method="lora", rank=2), progress=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1 * (step + 1))
    cb = LRs()
    res = train(model, _rows(), TrainConfig(steps=3, batch_size=2), lr=1e-3, optimizer=opt, scheduler=sched,
                callbacks=[cb], progress=False)
    assert cb.lrs == pytest.approx([0.1, 0.15, 0.2])  # 0.5 x (0.2, 0.3, 0.4): ours, not AdamW's linear decay
    assert res.state is not None and res.peak_state_bytes == 0  # SGD without momentum keeps no state
    assert len(res.step_seconds) == 3 and all(t > 0 for t in res.step_seconds)


def test_bare_hf_trainer_smoke(tmp_path):
    """The adapted model is still a plain HF model: transformers.Trainer trains it directly."""
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    apply(model, AdapterConfig(method="pissa", rank=4))
    lay = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    a0, w0 = lay.lora_A.detach().clone(), lay.base.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=_rows(8)).train()
    assert not torch.equal(lay.lora_A.detach(), a0)  # the adapter trained
    assert torch.equal(lay.base.weight.detach(), w0)  # the residual base did not


# -- CLI ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A tiny causal LM folder, a tiny BERT folder (both with MiniLM's tokenizer), a text file, a labelled folder."""
    from transformers import AutoTokenizer

    from rankwise.io.models import resolve_model

    root = tmp_path_factory.mktemp("tune_cli")
    tok = AutoTokenizer.from_pretrained(str(resolve_model("minilm-l6")))
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=tok.vocab_size))
    lm.save_pretrained(str(root / "lm"))
    tok.save_pretrained(str(root / "lm"))
    enc = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64))
    enc.save_pretrained(str(root / "enc"))
    tok.save_pretrained(str(root / "enc"))
    words = "the market rose as the bank cut rates and the team won the cup at home again".split()
    g = torch.Generator().manual_seed(1)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    (root / "text.txt").write_text(text)
    for label, vocab in (("money", "market bank rates profit shares"), ("sport", "team cup goal match win")):
        (root / "labelled" / label).mkdir(parents=True)
        vw = vocab.split()
        for i in range(12):
            sel = torch.randint(0, len(vw), (20,), generator=g).tolist()
            (root / "labelled" / label / f"{i}.txt").write_text(" ".join(vw[j] for j in sel))
    return root


def _cli(*args: str) -> int:
    from rankwise.cli.main import main

    return main(["tune", *args])


def test_cli_lm_merge_and_peft(tiny_folders, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    rc = _cli(str(tiny_folders / "lm"), "--method", "lora", "--task", "lm", "--data", str(tiny_folders / "text.txt"),
              "--steps", "3", "--lr", "1e-2", "--seq-len", "16", "--eval-tokens", "64", "--rank", "4",
              "--out", str(tmp_path / "l"), "--merge", str(tmp_path / "m"), "--export-peft", str(tmp_path / "p"),
              "--json", str(tmp_path / "run.json"))
    assert rc == 0
    err = capsys.readouterr().err
    assert "trainable" in err and "perplexity" in err
    meta = json.loads((tmp_path / "l" / "rankwise_adapter.json").read_text())
    assert meta["method"] == "lora" and meta["training"]["steps"] == 3 and meta["eval"]["metric"] == "perplexity"
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["trainable_parameters"] == meta["trainable_parameters"]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_folders / "lm")).eval()
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        got = peft.PeftModel.from_pretrained(base, str(tmp_path / "p"))(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_folders / "lm"))(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)  # training changed the model


def test_cli_classify_svfit_and_reload(tiny_folders, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rankwise.training import accuracy
    from rankwise.tune import load_adapter

    rc = _cli(str(tiny_folders / "enc"), "--method", "svfit", "--task", "classify",
              "--data", str(tiny_folders / "labelled"), "--epochs", "1", "--lr", "5e-3", "--seq-len", "32",
              "--out", str(tmp_path / "t"))
    assert rc == 0
    meta = json.loads((tmp_path / "t" / "rankwise_adapter.json").read_text())
    assert meta["labels"] == ["money", "sport"] and meta["eval"]["metric"] == "accuracy"
    assert meta["modules_to_save"] == ["classifier"]
    # the adapter + trained head reload onto a fresh copy of the base and reproduce the recorded accuracy
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_folders / "enc"), num_labels=2).eval()
    load_adapter(model, tmp_path / "t")
    from rankwise.io.texts import load_labelled

    texts, labels, _ = load_labelled(str(tiny_folders / "labelled"), "test")
    tok = AutoTokenizer.from_pretrained(str(tiny_folders / "enc"))
    assert accuracy(model, tok, texts, labels, seq_len=32, progress=False) == pytest.approx(meta["eval"]["value"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "dylora", "--rank", "4", "--eval-rank", "6"], "--eval-rank 6 is above the trained rank 4"),
        (["--rank", "0"], "rank must be a positive integer"),
        (["--task", "classify", "--data", "ptb"], "has no labels"),
        (["--method", "svfit", "--export-peft", "PEFT"], "PEFT cannot represent a svfit"),
        (["--targets", "nothing_matches"], "match no linear layer"),
        (["--rank", "32"], "must satisfy 0 < rank < min"),
        (["--method", "heal"], "heal trains the factors of a compressed model: pass a `rankwise compress` output"),
        (["--method", "welore-lrc"], "welore-lrc trains the factors of a compressed model"),
    ],
)
def test_cli_errors(args, message, tiny_folders, tmp_path, capsys):
    args = [a if a != "PEFT" else str(tmp_path / "p") for a in args]
    rc = _cli(str(tiny_folders / "lm"), "--data", str(tiny_folders / "text.txt"), "--steps", "1",
              "--out", str(tmp_path / "o"), *args)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("rankwise tune: error:")
    assert not (tmp_path / "o").exists()


def test_cli_method_choices_from_registry(tiny_folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli(str(tiny_folders / "lm"), "--method", "nope", "--out", str(tmp_path / "o"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "'lora-xs'" in err and "'dora'" in err


def test_cli_heal_compressed_checkpoint(tiny_folders, tmp_path):
    """heal on a `rankwise.save`-d compressed model: adapter reloads onto rankwise.load and equals --merge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rankwise
    from rankwise.surgery import LowRankLinear, find_targets, set_module
    from rankwise.tune import load_adapter, merge

    model = AutoModelForCausalLM.from_pretrained(str(tiny_folders / "lm"))
    for t in find_targets(model):
        set_module(model, t.name, LowRankLinear.from_linear(t.module, 4))
    rankwise.save(model, tmp_path / "c", tokenizer=AutoTokenizer.from_pretrained(str(tiny_folders / "lm")))
    rc = _cli(str(tmp_path / "c"), "--method", "heal", "--task", "lm", "--data", str(tiny_folders / "text.txt"),
              "--steps", "3", "--lr", "1e-2", "--seq-len", "16", "--eval-tokens", "64",
              "--out", str(tmp_path / "h"), "--merge", str(tmp_path / "m"))
    assert rc == 0
    healed = rankwise.load(tmp_path / "c")
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        before = healed(input_ids=ids).logits
        load_adapter(healed, tmp_path / "h")
        merge(healed)
        after = healed(input_ids=ids).logits
        dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()(input_ids=ids).logits
    assert torch.allclose(dense, after, atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("method", ["dora", "olora", "eva", "lora-ga"])
def test_cli_peft_format_export_equals_merge(method, tiny_folders, tmp_path):
    """PEFT-backed (and lora-ga) runs: --export-peft loads with peft.PeftModel on the untouched base and gives
    the --merge model's logits; --out reloads through rankwise.tune.load_adapter."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from rankwise.tune import load_adapter

    rc = _cli(str(tiny_folders / "lm"), "--method", method, "--data", str(tiny_folders / "text.txt"),
              "--steps", "2", "--lr", "1e-2", "--seq-len", "16", "--rank", "4", "--init-batches", "2",
              "--no-eval", "--out", str(tmp_path / "o"), "--merge", str(tmp_path / "m"),
              "--export-peft", str(tmp_path / "p"))
    assert rc == 0
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(0))

    def base():
        return AutoModelForCausalLM.from_pretrained(str(tiny_folders / "lm")).eval()

    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()(input_ids=ids).logits
        got = peft.PeftModel.from_pretrained(base(), str(tmp_path / "p"))(input_ids=ids).logits
        again = load_adapter(base(), tmp_path / "o").eval()(input_ids=ids).logits
        plain = base()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(again, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)  # training changed the model


def test_cli_dylora_eval_rank_and_lora_xs(tiny_folders, tmp_path):
    rc = _cli(str(tiny_folders / "lm"), "--method", "dylora", "--rank", "4", "--eval-rank", "2",
              "--data", str(tiny_folders / "text.txt"), "--steps", "2", "--seq-len", "16", "--eval-tokens", "64",
              "--out", str(tmp_path / "d"))
    assert rc == 0
    meta = json.loads((tmp_path / "d" / "rankwise_adapter.json").read_text())
    assert meta["config"]["eval_rank"] == 2 and meta["method"] == "dylora"
    rc = _cli(str(tiny_folders / "enc"), "--method", "lora-xs", "--data", str(tiny_folders / "labelled"),
              "--epochs", "1", "--seq-len", "32", "--rank", "4", "--out", str(tmp_path / "x"))
    assert rc == 0
    meta = json.loads((tmp_path / "x" / "rankwise_adapter.json").read_text())
    assert meta["eval"]["metric"] == "accuracy"  # a labelled folder implies --task classify
    head = 32 * 2 + 2  # the fresh classifier (hidden 32 → 2 labels) trains with the adapter
    assert meta["trainable_parameters"] == 16 * len(meta["targets"]) + head
