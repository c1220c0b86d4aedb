"""Training with adapters: the loss goes down for every method, HF Trainer works, the CLI runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from rankwise.tune import METHODS, AdapterConfig, adapter_layers, apply, trainable_parameters
from rankwise.tune.trainer import TrainConfig, train
from test_tune_adapters import base_for, tiny_llama

LR = {"lora": 1e-2, "pissa": 1e-2, "svfit": 3e-2, "salt": 1e-2, "sorsa": 1e-2, "loldu": 3e-2,
      "welore-lrc": 1e-2, "heal": 1e-2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FixedBatch:
    """Always the same batch: a few steps must lower its loss."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def steps_per_epoch(self) -> int:
        return 1

    def batch(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids, "labels": self.ids}


def _loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("method", METHODS)
def test_few_steps_lower_the_loss(method):
    model = base_for(method)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    apply(model, AdapterConfig(method=method, rank=4))
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    before = _loss(model, ids)
    res = train(model, FixedBatch(ids), TrainConfig(steps=12, lr=LR[method], batch_size=4), progress=False)
    after = _loss(model, ids)
    assert res.steps == 12 and len(res.losses) == 12
    assert after < before - 0.02, (before, after)
    for k, v in model.named_parameters():  # frozen weights did not move
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_hf_trainer_smoke(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    apply(model, AdapterConfig(method="pissa", rank=4))
    n_train = trainable_parameters(model)
    lay = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    a0, w0 = lay.lora_A.detach().clone(), lay.base.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 128, (16,), generator=g) for _ in range(8)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    out = trainer.train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(lay.lora_A.detach(), a0)  # the adapter trained
    assert torch.equal(lay.base.weight.detach(), w0)  # the residual base did not
    assert trainable_parameters(model) == n_train


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

    from rankwise.tune import load_adapter
    from rankwise.tune.trainer import accuracy

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
        (["--method", "dora"], "unknown adapter method"),
        (["--rank", "0"], "rank must be a positive integer"),
        (["--task", "classify", "--data", "ptb"], "has no labels"),
        (["--method", "svfit", "--export-peft", "PEFT"], "PEFT cannot represent a svfit"),
        (["--targets", "nothing_matches"], "match no linear layer"),
        (["--rank", "32"], "must satisfy 0 < rank < min"),
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
