"""Fuzz suite, Python API: misuse and hostile inputs raise one-line RankwiseError, never a late crash.

Configs of the wrong type, non-finite or out-of-range config values, calibration ids outside the
vocabulary, adapter tensors of the wrong shape or holding NaN, hostile checkpoints given to
``rankwise.load``, and a failing disk under ``rankwise.save``: each is refused at the call, with
a single line, and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import signal

import pytest
import torch

import fuzz_fixtures as fx
import rankwise
from rankwise.errors import RankwiseError
from rankwise.io.models import check_finite

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return fx.build_base(tmp_path_factory.mktemp("fuzzapi"))


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, RankwiseError) and msg and "\n" not in msg, repr(exc.value)
    return msg


# -- configs of the wrong type or with bad values -------------------------------------------------------
def _compress(model, cfg):
    return rankwise.compress(model, cfg, calib=torch.randint(0, fx.VOCAB, (2, 16)))


WRONG_TYPE = [
    pytest.param(lambda m: rankwise.compress(m, "0.2"), id="compress-str"),
    pytest.param(lambda m: rankwise.compress(m, 0.2), id="compress-float"),
    pytest.param(lambda m: rankwise.compress(m, {"ratio": 0.2}), id="compress-dict"),
    pytest.param(lambda m: rankwise.inspect(m, "svd"), id="inspect-str"),
    pytest.param(lambda m: rankwise.inspect(m, {"ratio": 0.2}), id="inspect-dict"),
    pytest.param(lambda m: rankwise.tune.apply(m, "lora"), id="tune-str"),
    pytest.param(lambda m: rankwise.tune.apply(m, {"method": "lora"}), id="tune-dict"),
]


@pytest.mark.parametrize("call", WRONG_TYPE)
def test_config_of_wrong_type(call):
    with pytest.raises(RankwiseError) as info:
        call(fx.tiny_llama())
    one_line(info)


BAD_VALUES = [
    ("CompressConfig", {"ratio": math.nan}), ("CompressConfig", {"ratio": math.inf}),
    ("CompressConfig", {"ratio": "0.2"}), ("CompressConfig", {"min_rank_frac": math.nan}),
    ("CompressConfig", {"shrink": math.inf}), ("CompressConfig", {"calib_samples": -1}),
    ("CompressConfig", {"calib_samples": 1.5}), ("CompressConfig", {"seed": 2**70}),
    ("CompressConfig", {"seq_len": 0}), ("CompressConfig", {"method": "nope"}),
    ("InspectConfig", {"ratio": math.nan}), ("InspectConfig", {"min_saving": math.inf}),
    ("InspectConfig", {"intruder_top": 0}),
    ("AdapterConfig", {"method": "lora", "alpha": math.inf}), ("AdapterConfig", {"method": "lora", "alpha": math.nan}),
    ("AdapterConfig", {"method": "lora", "rank": 0}), ("AdapterConfig", {"method": "lora", "rank": 2.5}),
    ("AdapterConfig", {"method": "lora", "dropout": math.nan}), ("AdapterConfig", {"method": "nope"}),
    ("AdapterConfig", {"method": "lora", "seed": 2**70}),
    ("TrainConfig", {"lr": math.nan}), ("TrainConfig", {"epochs": math.inf}), ("TrainConfig", {"eval_tokens": -5}),
    ("TrainConfig", {"seed": 2**70}), ("TrainConfig", {"batch_size": 0}),
]


def _config_cls(name: str):
    if name == "AdapterConfig":
        from rankwise.tune import AdapterConfig

        return AdapterConfig
    if name == "TrainConfig":
        from rankwise.training import TrainConfig

        return TrainConfig
    return getattr(rankwise, name)


@pytest.mark.parametrize(("cls", "kw"), BAD_VALUES, ids=[f"{c}-{list(k)[-1]}={k[list(k)[-1]]}" for c, k in BAD_VALUES])
def test_config_bad_value(cls, kw):
    with pytest.raises(RankwiseError) as info:
        cfg = _config_cls(cls)(**kw)
        if hasattr(cfg, "validate"):
            cfg.validate()
    one_line(info)


# -- calibration ids out of range --------------------------------------------------------------------------
@pytest.mark.parametrize("calib", [
    pytest.param(lambda: torch.full((2, 16), fx.VOCAB, dtype=torch.long), id="id-equals-vocab"),
    pytest.param(lambda: torch.full((2, 16), 10**9, dtype=torch.long), id="id-huge"),
    pytest.param(lambda: torch.full((2, 16), -1, dtype=torch.long), id="id-negative"),
    pytest.param(lambda: torch.rand(2, 16), id="float-ids"),
    pytest.param(lambda: torch.zeros(0, 16, dtype=torch.long), id="no-windows"),
    pytest.param(lambda: torch.zeros(16, dtype=torch.long), id="one-dimensional"),
])
def test_calibration_ids_out_of_range(calib):
    model = fx.tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError) as info:
        rankwise.compress(model, rankwise.CompressConfig(method="whiten", alloc="uniform"), calib=calib())
    one_line(info)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_nan_weight_named_by_compress():
    model = fx.tiny_llama()
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w[0, 0] = math.nan
    with pytest.raises(RankwiseError) as info:
        _compress(model, rankwise.CompressConfig(method="svd", alloc="uniform"))
    assert "down_proj" in one_line(info)


# -- adapters: wrong shapes, NaN, garbage -------------------------------------------------------------------
def _broken_adapter(fixtures, tmp_path, change):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "adapter"
    shutil.copytree(fixtures["adapter"], d)
    f = d / "adapter.safetensors"
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata={"format": "rankwise-adapter"})
    return d


def _first(tensors, suffix):
    return sorted(k for k in tensors if k.endswith(suffix))[0]


ADAPTER_BREAKS = {
    "A-wrong-cols": lambda t: t.__setitem__(_first(t, "lora_A"), torch.zeros(2, 7)),
    "B-wrong-rows": lambda t: t.__setitem__(_first(t, "lora_B"), torch.zeros(5, 2)),
    "rank-mismatch": lambda t: t.__setitem__(_first(t, "lora_A"), torch.zeros(3, t[_first(t, "lora_A")].shape[1])),
    "A-1d": lambda t: t.__setitem__(_first(t, "lora_A"), torch.zeros(7)),
    "nan-A": lambda t: t[_first(t, "lora_A")].view(-1).__setitem__(0, math.nan),
    "inf-B": lambda t: t[_first(t, "lora_B")].view(-1).__setitem__(0, math.inf),
    "missing-tensor": lambda t: t.pop(_first(t, "lora_A")),
}


@pytest.mark.parametrize("brk", list(ADAPTER_BREAKS))
def test_adapter_tensors_broken(brk, fixtures, tmp_path):
    from rankwise.tune import load_adapter

    d = _broken_adapter(fixtures, tmp_path, ADAPTER_BREAKS[brk])
    model = fx.tiny_llama()
    with pytest.raises(RankwiseError) as info:
        load_adapter(model, d)
    msg = one_line(info)
    if brk.startswith(("nan", "inf")):
        assert "NaN" in msg or "nan" in msg.lower() or "inf" in msg.lower()
    assert not getattr(model, "rankwise_adapter", None)  # the model is left as it was


def test_adapter_file_garbage(fixtures, tmp_path):
    from rankwise.tune import load_adapter

    d = tmp_path / "adapter"
    shutil.copytree(fixtures["adapter"], d)
    (d / "adapter.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(RankwiseError) as info:
        load_adapter(fx.tiny_llama(), d)
    one_line(info)


# -- hostile checkpoints given to rankwise.load -------------------------------------------------------------
LOAD_CASES = [c for c in fx.MODEL_CASES if c.base == "comp"] + [
    fx.Case("comp-config-huge-hidden", "comp", fx.big_config("hidden_size", 2**40)),
    fx.Case("comp-config-no-model-type", "comp", fx.edit_json("config.json", lambda d: d.pop("model_type"))),
    fx.Case("comp-index-outside", "comp", fx.as_index("../outside.safetensors")),
]


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c.name for c in LOAD_CASES])
def test_load_hostile_checkpoint(case, fixtures, tmp_path):
    d = case.make(fixtures, tmp_path / "ckpt")
    with pytest.raises(RankwiseError) as info:
        model = rankwise.load(d)
        check_finite(model, d)  # what every verb does after loading
    one_line(info)


@pytest.mark.parametrize("name", ["AutoConfig", "__class__", "os.system", "PreTrainedModel"])
@pytest.mark.parametrize("base", ["dense", "comp"])
def test_class_named_by_config_is_never_looked_up_blindly(name, base, fixtures, tmp_path):
    """``architectures`` naming an arbitrary transformers attribute: refused, or ignored for the real class."""
    from transformers import LlamaForCausalLM

    d = fx.Case("arch", base, fx.hostile_architecture(name)).make(fixtures, tmp_path / "m")
    try:
        model = rankwise.load(d) if base == "comp" else rankwise.load_model(d)
    except RankwiseError as exc:
        assert "\n" not in str(exc)
        return
    assert type(model) is LlamaForCausalLM


# -- a failing disk under rankwise.save ------------------------------------------------------------------------
@contextlib.contextmanager
def file_size_limit(n_bytes: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_on_failing_disk_keeps_old_and_leaves_nothing(overwrite, tmp_path):
    out = tmp_path / "ckpt"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("previous output")
    with pytest.raises(RankwiseError) as info, file_size_limit(4096):
        rankwise.save(fx.tiny_llama(), out, overwrite=overwrite)
    assert "too large" in one_line(info)
    assert sorted(os.listdir(tmp_path)) == (["ckpt"] if overwrite else [])
    if overwrite:
        assert os.listdir(out) == ["old.txt"]
