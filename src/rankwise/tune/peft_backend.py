"""PEFT-backed adapters: ``dora``, ``adalora``, ``eva``, ``olora``, ``corda``, ``loftq``.

PEFT already implements these well; rankwise builds the matching PEFT
configuration, calls ``peft.get_peft_model`` (plus PEFT's own data-driven
initialisers, ``initialize_lora_eva_weights`` and ``preprocess_corda``, fed
with rankwise's training batches) and adds what PEFT lacks around them: the
``rankwise tune`` CLI and data, a base-model fingerprint stored beside PEFT's
own files so an adapter cannot be loaded on another base, healing of
compressed models (targets may be the ``nn.Linear`` factors of a LowRankLinear)
and loading for ``inspect --compare``. The saved folder *is* PEFT's format
(``adapter_config.json`` + ``adapter_model.safetensors``): methods that move
part of W into the adapter (olora, corda) are saved through PEFT's own
conversion to a LoRA on the original weights, so ``PeftModel.from_pretrained``
on the untouched base reproduces the trained model.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.targets import Conv1D

RANKWISE_BASE_FILE = "rankwise_base.safetensors"
"""loftq only: the targeted base weights PEFT replaced by their quantised version (not a low-rank change)."""


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise RankwiseError("this adapter method is built through PEFT: pip install 'peft>=0.21'.") from exc
    return peft


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` or a model that carries PEFT tuner layers (already PEFT-wrapped)."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    if isinstance(model, PeftModel):
        return True
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def peft_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: PEFT tuner layer} of a PEFT-wrapped model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _eva_layer_inputs(layer_input, model_input, layer_name):
    """PEFT's EVA input selection, plus pooled 2-D inputs (BERT's pooler sees one vector per sequence,
    which PEFT's language-modelling default cannot index with the token mask)."""
    from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling

    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if x.dim() == 2:
        return x.contiguous()  # PEFT hashes it with .view(-1)
    return prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name)


EVA_RHO = 2.0
"""EVA's ρ (PEFT's EvaConfig): each layer's incremental SVD keeps round(ρ·r) components."""
EVA_MAX_PASSES = 50
"""rankwise's cap on PEFT's EVA loop, in forwards of the (one) init batch (PEFT cycles until every layer converges)."""


def _eva_batches(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The init batches as ONE batch for PEFT's EVA (sequences of different lengths right-padded with 0 and masked
    out with ``attention_mask`` 0, which PEFT's token selection drops).

    PEFT's EVA streams batches through an incremental PCA per layer and stops a layer when consecutive estimates
    agree (cosine ≥ τ = 0.99 for every component its rank needs), cycling over the data until every layer has.
    On a small, fixed init set fed batch by batch the estimate keeps moving as the batches alternate: near-equal
    singular values swap and rotate (measured on MiniLM, 8 batches of 4 × 128 tokens in groups of 16 sequences:
    31 of 37 layers converged after 19 forwards, pairs of components still at |cos| 0.3–0.9), and a layer fed one
    vector per sequence (an encoder's pooler) skips every batch with fewer sequences than its round(ρ·r)
    components. With all init data in one batch the second pass reproduces the first, every layer converges in a
    few forwards (MiniLM: 37/37 in 34 s) and the components are the PCA of all the init data, which is what EVA's
    incremental PCA estimates.
    """
    if len(batches) == 1:
        return batches
    width = max(b["input_ids"].shape[1] for b in batches)
    padded = []
    for b in batches:
        b = dict(b)
        if "attention_mask" not in b:
            b["attention_mask"] = torch.ones_like(b["input_ids"])
        pad = width - b["input_ids"].shape[1]
        if pad:
            b = {k: torch.nn.functional.pad(v, (0, pad)) if v.dim() == 2 else v for k, v in b.items()}
        padded.append(b)
    return [{k: torch.cat([b[k] for b in padded]) for k in padded[0]}]


class _CappedForward:
    """PEFT's EVA forward (``model(**inputs)``) that gives up with a one-line error after ``limit`` forwards."""

    def __init__(self, limit: int, sequences: int, rows: int) -> None:
        self.limit, self.sequences, self.rows, self.calls = limit, sequences, rows, 0

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        self.calls += 1
        if self.calls > self.limit:
            few = (f"; a layer fed one vector per sequence, like an encoder's pooler, needs >= {self.rows} sequences "
                   f"and the init data holds {self.sequences}") if self.sequences < self.rows else ""
            raise RankwiseError(
                f"eva: PEFT's incremental SVD did not converge for every layer in {self.limit} forwards over the "
                f"init data{few}: raise --init-batches or choose another method.")
        return model(**inputs)


def _sign_invariant_svd_hook():
    """PEFT's EVA ``SVDHook`` with a sign-invariant convergence test (|cos| ≥ τ instead of cos ≥ τ).

    PEFT's incremental PCA fixes each component's sign by its largest-|v| entry (``_svd_flip``). When two entries
    of a component have nearly equal magnitude and opposite signs (BERT's outlier features), the batches of the
    init data pick different ones and the component flips sign from step to step: cosine −1.000 with its
    predecessor, so PEFT never counts it converged although it has not moved (measured on MiniLM: 1–4 of the 16
    components of most layers flipped at every step, and the init ran until rankwise's pass cap). A sign is
    irrelevant to EVA's init (lora_A = the components, lora_B = 0), so only the test changes; the rest is PEFT's.
    """
    from peft.tuners.lora.eva import SVDHook

    class SignInvariantSVDHook(SVDHook):
        def __call__(self, model, input, output):  # noqa: A002 - forward-hook signature
            fitted = hasattr(self.svd, "components_")
            prev = self.svd.components_.clone() if fitted else None
            seen = self.svd.n_samples_seen_.clone() if fitted else None
            super().__call__(model, input, output)
            if prev is None or torch.equal(seen, self.svd.n_samples_seen_):  # first fit, or PEFT skipped the step
                return
            comps = self.svd.components_
            sim = torch.nn.functional.cosine_similarity(comps.reshape(-1, comps.shape[-1]),
                                                        prev.reshape(-1, prev.shape[-1]))
            self.converged = sim.abs() >= self.sim_thresh

    return SignInvariantSVDHook


@dataclass(frozen=True)
class PeftMethod:
    """How one PEFT-backed method is configured, initialised and saved.

    ``supported``: the layer types PEFT's implementation of the method accepts
    (checked before PEFT is called, so the error names the offending layer).
    ``converts``: PEFT's ``path_initial_model_for_weight_conversion`` turns the
    trained adapter into a LoRA on the original weights (olora, corda).
    ``keeps_base``: the method replaced the base weights by something that is
    not a low-rank change (loftq's quantised W); those are saved beside.
    """

    name: str
    supported: tuple[type, ...]
    needs_data: bool = False
    converts: bool = False
    keeps_base: bool = False

    # -- configuration ------------------------------------------------------------------------------
    def peft_config(self, config, targets: list[str], mts: list[str]):
        peft = _peft()
        common: dict[str, Any] = {"target_modules": list(targets), "lora_alpha": config.lora_alpha,
                                  "lora_dropout": float(config.dropout), "modules_to_save": mts or None}
        if self.name == "adalora":
            if config.total_steps is None:
                raise RankwiseError("adalora's rank schedule needs the training length: set "
                                    "AdapterConfig(total_steps=...) (the CLI sets it from --steps/--epochs).")
            target = config.target_rank or max(1, config.r // 2)
            return peft.AdaLoraConfig(init_r=config.r, target_r=target, total_step=int(config.total_steps),
                                      **common)
        kw: dict[str, Any] = {"r": config.r, **common}
        if self.name == "dora":
            kw["use_dora"] = True
        elif self.name == "olora":
            kw["init_lora_weights"] = "olora"
        elif self.name == "eva":
            kw["init_lora_weights"] = "eva"
            kw["eva_config"] = peft.EvaConfig(rho=EVA_RHO)
        elif self.name == "corda":
            from peft.tuners.lora.config import CordaConfig

            kw["init_lora_weights"] = "corda"
            kw["corda_config"] = CordaConfig(corda_method="ipm")
        elif self.name == "loftq" and loftq_on_peft_device():
            kw["init_lora_weights"] = "loftq"
            kw["loftq_config"] = peft.LoftQConfig(loftq_bits=LOFTQ_BITS, loftq_iter=int(config.loftq_iter))
        # loftq elsewhere: a plain LoRA config, initialised afterwards by loftq_init_on_device (PEFT's algorithm)
        return peft.LoraConfig(**kw)

    def check_layers(self, targets: list[tuple[str, nn.Module]]) -> None:
        """One-line error naming the first targeted layer type PEFT's method does not support."""
        for name, mod in targets:
            if not isinstance(mod, self.supported):
                kinds = ", ".join(t.__name__ for t in self.supported)
                raise RankwiseError(
                    f"PEFT's {self.name} does not support layers of type {type(mod).__name__} ({name}); it adapts "
                    f"{kinds} only: choose other --targets."
                )

    def check_environment(self) -> None:
        """One-line error when this machine lacks what the method needs (loftq: bitsandbytes' NF4 quantiser).

        PEFT 0.21's ``loftq_init`` quantises W to NF4 with bitsandbytes only (its pure-torch ``NFQuantizer`` was
        removed in PEFT 0.20: "Native support for nf4 is was removed"). Without a CUDA/XPU device rankwise runs the
        same algorithm on W's own device (:func:`loftq_init_on_device`), so only bitsandbytes is required.
        """
        if self.name == "loftq":
            missing = loftq_missing()
            if missing:
                raise RankwiseError(f"loftq needs {' and '.join(missing)}: LoftQ quantises W to NF4 with "
                                    f"bitsandbytes' quantiser (PEFT {_peft().__version__} has no other); use olora "
                                    "or pissa without it.")

    # -- build ----------------------------------------------------------------------------------------
    def build(self, model: nn.Module, config, targets: list[tuple[str, nn.Module]], mts: list[str],
              data: Iterable[dict[str, torch.Tensor]] | None = None, progress: bool = True) -> nn.Module:
        """The PeftModel of ``model`` (modified in place) with this method's adapter, initialised."""
        self.check_layers(targets)
        self.check_environment()
        batches = None
        if self.needs_data:
            batches = [dict(b) for b in (data or [])][: config.init_batches]
            if not batches:
                raise RankwiseError(f"{self.name} initialises from data: pass batches, "
                                    "rankwise.tune.apply(model, config, data=batches) (the CLI uses --data).")
        peft = _peft()
        pcfg = self.peft_config(config, [n for n, _ in targets], mts)
        torch.manual_seed(int(config.seed))  # PEFT draws LoRA's Kaiming A from the global generator
        device = next(model.parameters()).device
        if self.name == "corda":
            from peft.tuners.lora.corda import preprocess_corda

            with tempfile.TemporaryDirectory(prefix="rankwise-corda-") as tmp:
                # PEFT's covariance hook squeezes the batch axis and takes xᵀx, which breaks on a layer fed one
                # vector per sequence (an encoder's pooler: (1, n) → (n,), a scalar "covariance"). The same
                # statistics, computed on (-1, n) rows, reach PEFT through its own covariance_file.
                pcfg.corda_config.covariance_file = os.path.join(tmp, "covariance.pt")
                torch.save(_corda_covariances(model, pcfg, batches, device), pcfg.corda_config.covariance_file)
                preprocess_corda(model, pcfg)
            pcfg.corda_config.covariance_file = None
        pm = peft.get_peft_model(model, pcfg, low_cpu_mem_usage=self.name == "eva")
        if self.name == "eva":
            from peft import initialize_lora_eva_weights

            from rankwise.progress import quiet

            rows = round(EVA_RHO * config.r)  # PEFT's n_components per layer
            moved = [{k: v.to(device) for k, v in b.items() if k != "labels"}
                     for b in _eva_batches([{k: v for k, v in b.items() if k != "labels"} for b in batches])]
            import peft.tuners.lora.eva as peft_eva

            original = peft_eva.SVDHook
            peft_eva.SVDHook = _sign_invariant_svd_hook()  # what PEFT's get_eva_state_dict instantiates
            try:
                initialize_lora_eva_weights(pm, moved, prepare_layer_inputs_fn=_eva_layer_inputs,
                                            forward_fn=_CappedForward(EVA_MAX_PASSES, len(moved[0]["input_ids"]),
                                                                      rows),
                                            show_progress_bar=progress and not quiet())
            finally:
                peft_eva.SVDHook = original
        if self.name == "loftq" and not loftq_on_peft_device():
            loftq_init_on_device(pm, num_bits=LOFTQ_BITS, num_iter=int(config.loftq_iter), progress=progress)
        init_dir = None
        if self.converts:
            # PEFT's recipe for a LoRA on the original weights: keep the initial adapter, saved as plain LoRA
            init_dir = tempfile.TemporaryDirectory(prefix="rankwise-peft-init-")
            c = pm.peft_config["default"]
            old = c.init_lora_weights
            c.init_lora_weights = True
            pm.save_pretrained(init_dir.name)
            c.init_lora_weights = old
        pm._rankwise_init_dir = init_dir  # noqa: SLF001 - lives as long as the model
        return pm

    # -- parameters -----------------------------------------------------------------------------------
    def closed_form_params(self, layer: nn.Module) -> int:
        """Trainable parameters of one PEFT layer from the method's formula and the layer's rank."""
        base = layer.get_base_layer()
        if isinstance(base, Conv1D):
            n, m = base.weight.shape
        else:
            m, n = base.weight.shape
        r = int(layer.r["default"])
        if self.name == "adalora":
            return r * (m + n) + r  # P (m×r), Q (r×n) and the r singular values E
        if self.name == "dora":
            return r * (m + n) + m  # plus the magnitude vector
        return r * (m + n)


_LINEAR = (nn.Linear, Conv1D)
PEFT_BUILDERS: dict[str, PeftMethod] = {
    "dora": PeftMethod("dora", _LINEAR),
    "adalora": PeftMethod("adalora", _LINEAR),
    "eva": PeftMethod("eva", _LINEAR, needs_data=True),
    "olora": PeftMethod("olora", (nn.Linear,), converts=True),
    "corda": PeftMethod("corda", (nn.Linear,), needs_data=True, converts=True),
    "loftq": PeftMethod("loftq", (nn.Linear,), keeps_base=True),
}


LOFTQ_BITS = 4
"""loftq's quantisation width: NF4 (PEFT's LoftQConfig default)."""


def loftq_missing() -> list[str]:
    """What this machine lacks for the LoftQ init (empty when it can run): bitsandbytes, whose NF4 quantiser
    (``bitsandbytes.nn.Params4bit``) both paths use; its CPU path checked with bitsandbytes 0.50.2."""
    import importlib.util

    return [] if importlib.util.find_spec("bitsandbytes") is not None else ["bitsandbytes (pip install bitsandbytes)"]


def loftq_on_peft_device() -> bool:
    """True where PEFT's own ``loftq_init`` can run: it computes on ``"cuda"`` (or ``"xpu"``) unconditionally."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or (xpu is not None and xpu.is_available())


@torch.no_grad()
def loftq_init_on_device(pm: nn.Module, num_bits: int = LOFTQ_BITS, num_iter: int = 1, progress: bool = True) -> None:
    """PEFT's LoftQ init of every LoRA layer of ``pm``, computed on the weight's own device (CPU included).

    Why not PEFT's: ``peft.utils.loftq_utils.loftq_init`` (0.21) moves W to ``"cuda"``/``"xpu"`` unconditionally,
    so it has no CPU path, and its pure-torch ``NFQuantizer`` is gone (removed in PEFT 0.20). This is the same
    algorithm, line for line, with the same quantiser — bitsandbytes' ``Params4bit(..., compress_statistics=False,
    quant_type="nf4")`` (blocks of 64, one fp32 absmax each; bitsandbytes quantises on CPU too) and its
    ``dequantize_4bit`` — and PEFT's own ``_low_rank_decomposition``: Q = NF4(W − B A) (B A = 0 at first),
    L, R = rank-r SVD of W − Q split as U√S, √S Vᵀ, repeated ``num_iter`` times; lora_A = R, lora_B = L (no 1/scale,
    like PEFT) and the base weight replaced by Q, as PEFT's ``LoraLayer.loftq_init`` does.
    """
    if num_bits != 4:
        raise RankwiseError(f"loftq on this device supports 4-bit NF4 only, got {num_bits} bits.")
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    from rankwise.progress import progress as progress_bar

    layers = [(n, lay) for n, lay in peft_layers(pm).items() if "default" in getattr(lay, "lora_A", {})]
    for name, layer in progress_bar(layers, desc="loftq init", unit="layer", enabled=progress):
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear):  # Conv1D stores Wᵀ: PEFT's R would be r×out where lora_A is r×in
            raise RankwiseError(f"PEFT's loftq does not support layers of type {type(base).__name__} "
                                f"({name.removeprefix('base_model.model.')}); "
                                "it adapts Linear only: choose other --targets.")
        device, dtype = base.weight.device, base.weight.dtype
        weight = base.weight.detach().to(torch.float32)
        res = weight.clone()
        for i in range(num_iter):
            qweight = bnb.nn.Params4bit(res.to("cpu"), requires_grad=False, compress_statistics=False,
                                        quant_type="nf4").to(device)
            dequantized = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
            res = weight - dequantized
            out = _low_rank_decomposition(res, reduced_rank=int(layer.r["default"]))
            lora_b, lora_a = out["L"], out["R"]
            if i + 1 == num_iter:
                break
            res = weight - torch.mm(lora_b, lora_a)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a.data = lora_a.to(device=a.device, dtype=a.dtype).contiguous()
        b.data = lora_b.to(device=b.device, dtype=b.dtype).contiguous()
        base.weight.data = dequantized.to(device=device, dtype=dtype)


def method_of(model: nn.Module) -> PeftMethod:
    info = getattr(model, "rankwise_adapter", None)
    if info is None:
        raise RankwiseError("this PEFT model was not built by rankwise.tune.apply; use PEFT's own API on it.")
    return PEFT_BUILDERS[info["config"].method]


def closed_form_trainable(model: nn.Module) -> int:
    pm = method_of(model)
    total = sum(pm.closed_form_params(layer) for layer in peft_layers(model).values()
                if hasattr(layer, "r") and "default" in getattr(layer, "r", {}))
    for name in model.rankwise_adapter["modules_to_save"]:
        sub = model.base_model.model.get_submodule(name)
        copies = getattr(sub, "modules_to_save", None)  # PEFT's wrapper: the frozen original + the trained copy
        if copies is not None and "default" in copies:
            sub = copies["default"]
        total += sum(p.numel() for p in sub.parameters())
    return total


# -- save / load ----------------------------------------------------------------------------------
def save(model: nn.Module, folder: Path, record: dict[str, Any] | None) -> None:
    """Write PEFT's files (converted to a LoRA on the original W where PEFT can) + rankwise_adapter.json
    (``record``; None writes PEFT's files only, for ``export_peft``)."""
    from safetensors.torch import save_file

    from rankwise.tune.api import META_FILE

    pm = method_of(model)
    init_dir = getattr(model, "_rankwise_init_dir", None)
    kw = {}
    if pm.converts and init_dir is not None:
        kw["path_initial_model_for_weight_conversion"] = init_dir.name
    c = model.peft_config["default"]
    init, loftq_cfg = c.init_lora_weights, getattr(c, "loftq_config", {})
    if pm.name == "loftq":  # already initialised: PeftModel.from_pretrained must not run LoftQ (CUDA-only) again
        c.init_lora_weights, c.loftq_config = True, {}
    try:
        model.save_pretrained(str(folder), **kw)
    finally:
        c.init_lora_weights, c.loftq_config = init, loftq_cfg
    if pm.keeps_base:
        tensors = {n.removeprefix("base_model.model."): layer.get_base_layer().weight.detach().cpu().contiguous()
                   for n, layer in peft_layers(model).items()}  # keyed by the plain model's module names
        save_file(tensors, str(folder / RANKWISE_BASE_FILE))
    if record is not None:
        (folder / META_FILE).write_text(json.dumps(record, indent=2))


def _target_shapes(folder: Path) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of every LoRA pair in a PEFT adapter folder."""
    from safetensors import safe_open

    f = folder / "adapter_model.safetensors"
    if not f.is_file():
        raise RankwiseError(f"{folder} has no adapter_model.safetensors; pass a folder written by PEFT's "
                            "save_pretrained or rankwise tune.")
    shapes: dict[str, list[int]] = {}
    with safe_open(str(f), framework="pt") as h:
        for k in h.keys():
            m = re.match(r"base_model\.model\.(.+)\.lora_([AB])(?:\.weight)?$", k)
            if not m:
                continue
            s = h.get_slice(k).get_shape()
            d = shapes.setdefault(m.group(1), [0, 0])
            if m.group(2) == "A":
                d[1] = int(s[-1])
            else:
                d[0] = int(s[0])
    return {k: (v[0], v[1]) for k, v in shapes.items()}


def check_peft_folder_base(model: nn.Module, folder: Path) -> dict[str, Any]:
    """PEFT's adapter_config.json of ``folder`` after checking it was made for ``model`` (one-line error if not).

    A rankwise-written folder carries the base fingerprint (checked by the caller); a folder from PEFT
    itself is checked by its target layers: each must exist in ``model`` with the adapter's shapes.
    """
    from rankwise.surgery.modules import get_module
    from rankwise.surgery.targets import Target

    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise RankwiseError(f"{folder} has no adapter_config.json; it is not a PEFT adapter folder.")
    try:
        pcfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise RankwiseError(f"{cfg_file} is not valid JSON ({exc}).") from exc
    where = pcfg.get("base_model_name_or_path") or "its base model"
    for name, (out_f, in_f) in _target_shapes(folder).items():
        try:
            mod = get_module(model, name)
        except AttributeError:
            raise RankwiseError(f"the PEFT adapter in {folder} was made for another base ({where}): this model "
                                f"has no layer {name!r}.") from None
        if isinstance(mod, (nn.Linear, Conv1D)):
            m, n = Target(name, mod).shape
            if (m, n) != (out_f, in_f):
                raise RankwiseError(f"the PEFT adapter in {folder} was made for another base ({where}): {name} is "
                                    f"{m}x{n} here but {out_f}x{in_f} in the adapter.")
    return pcfg


def load(model: nn.Module, folder: Path, meta: dict[str, Any] | None, is_trainable: bool = False) -> nn.Module:
    """PeftModel.from_pretrained(model, folder) after the base checks; loftq's base weights put back."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from rankwise.surgery.modules import get_module

    if is_peft_model(model):
        raise RankwiseError("the model is already PEFT-wrapped; load the adapter on the plain base model.")
    check_peft_folder_base(model, folder)
    base_file = folder / RANKWISE_BASE_FILE
    if base_file.is_file():
        with torch.no_grad():
            for name, w in load_file(str(base_file)).items():
                get_module(model, name).weight.copy_(w)
    pm = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    if meta is not None:
        from rankwise.tune.config import AdapterConfig

        pm.rankwise_adapter = {
            "config": AdapterConfig.from_dict(meta["config"]),
            "fingerprint": meta["base_fingerprint"],
            "targets": list(meta["targets"]),
            "modules_to_save": list(meta.get("modules_to_save", [])),
            "backend": "peft",
        }
        pm._rankwise_init_dir = None  # noqa: SLF001 - loaded adapters are already converted
    return pm


def load_peft_adapter(model: nn.Module, path: str | os.PathLike, merge: bool = True) -> nn.Module:
    """A PEFT adapter folder (PEFT's own or rankwise's) on ``model``: for ``inspect --compare``.

    Checks the base (rankwise's fingerprint when present, else the target layer shapes), loads with
    ``peft.PeftModel.from_pretrained`` and, with ``merge`` (default), returns the merged plain model
    whose weights inspect compares with the base's.
    """
    from rankwise.tune.api import META_FILE, check_fingerprint, read_adapter_meta

    folder = Path(path).expanduser()
    meta = read_adapter_meta(folder) if (folder / META_FILE).is_file() else None
    if meta is not None:
        check_fingerprint(model, folder, meta)
    pm = load(model, folder, meta)
    return pm.merge_and_unload() if merge else pm


@torch.no_grad()
def _corda_covariances(model: nn.Module, pcfg: Any, batches: list[dict[str, torch.Tensor]],
                       device: torch.device) -> dict[str, torch.Tensor]:
    """PEFT's CorDA input covariances (``peft.tuners.lora.corda.calib_cov_distribution``), one sequence per
    forward: for each target, the mean over forwards of x̂ᵀx̂ with x̂ = x / |max x| and x the layer input as
    (-1, n) rows (PEFT squeezes the batch axis instead, which loses the row axis of pooled inputs)."""
    from peft.tuners.lora.corda import target_modules

    fp16 = bool(getattr(pcfg.corda_config, "use_float16_for_covariance", False))
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):  # noqa: ANN001 - forward-hook signature
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if not fp16:
                x = x.float()
            x = x / torch.max(x).abs()
            if torch.isnan(x).any() or torch.isinf(x).any():
                raise RankwiseError(f"corda: non-finite inputs reach {name}; check the calibration data.")
            sums[name] = sums.get(name, 0) + x.t().matmul(x)
            counts[name] = counts.get(name, 0) + 1

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in target_modules(model, pcfg)]
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            for i in range(len(b["input_ids"])):
                model(**{k: v[i: i + 1].to(device) for k, v in b.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: sums[n] / counts[n] for n in sums}
