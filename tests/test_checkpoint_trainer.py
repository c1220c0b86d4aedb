"""Trainer with a callback that factorises layers: save_model, checkpoints, reload and resume stay exact (J.1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import rankwise  # noqa: F401  (registers the "rankwise" quantizer with transformers)
from rankwise.io.checkpoint import mark_factorised
from rankwise.surgery import LowRankLinear, find_targets, set_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 48


class Factorise(TrainerCallback):
    """Swaps the attention projections for rank-4 LowRankLinear when the Trainer is built (before its optimizer)."""

    def on_init_end(self, args, state, control, model=None, **kwargs):
        for t in [t for t in find_targets(model) if "self_attn" in t.name]:  # none left in a reloaded model
            set_module(model, t.name, LowRankLinear.from_linear(t.module, 4))
        mark_factorised(model)


class Windows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (32, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: Path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             data_seed=0, disable_tqdm=True, dataloader_num_workers=0, save_only_model=False)


def _losses(trainer: Trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(VOCAB).view(2, -1)).logits


def test_trainer_factorising_callback_saves_reloads_and_resumes_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    t1 = Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=Windows(), callbacks=[Factorise()])
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 8
    t1.train()
    losses = _losses(t1)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    model.eval()
    final = _logits(model)
    t1.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-6"):
        back = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        assert sum(isinstance(m, LowRankLinear) for m in back.modules()) == 8
        assert torch.equal(_logits(back), final), folder
    # resume from the step-3 checkpoint into a model rebuilt from it: the same losses and the same end point
    resumed = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "checkpoint-3"))
    t2 = Trainer(model=resumed, args=_args(tmp_path / "run2"), train_dataset=Windows(), callbacks=[Factorise()])
    t2.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    again = _losses(t2)
    assert sorted(again) == [1, 2, 3, 4, 5, 6]  # 1-3 come from the checkpoint's trainer_state.json
    for step in (4, 5, 6):
        assert again[step] == losses[step], step  # bit for bit
    resumed.eval()
    assert torch.equal(_logits(resumed), final)
