"""The ``quant_method: "rankwise"`` quantizer: how transformers' ``from_pretrained`` rebuilds factorised layers.

A rankwise checkpoint's ``config.json`` carries::

    "quantization_config": {"quant_method": "rankwise", "format": "rankwise/2",
                            "layers": {"model.layers.0.self_attn.q_proj": {"type": "lowrank", "rank": 24, ...}}}

With ``import rankwise`` (which registers this module's classes through
``transformers.quantizers.register_quantization_config`` / ``register_quantizer``),
``AutoModelForCausalLM.from_pretrained(folder)`` builds the model skeleton on the meta
device as usual, :meth:`RankwiseHfQuantizer._process_model_before_weight_loading`
swaps in an empty layer of the registered type (``rankwise.surgery.layers.LAYER_TYPES``)
for every entry of ``layers``, and transformers' own loader fills ``name.A.weight``,
``name.B.weight``, ``name.B.bias`` (device maps, offload and dtype included).

``save_pretrained`` (and so ``Trainer.save_model`` and Trainer checkpoints) of such a
model goes through :meth:`RankwiseHfQuantizer.get_state_dict_and_metadata`, which
refreshes the layer map from the model and adds a zero-element *placeholder* tensor
under each factorised layer's dense name (``name.weight``). Plain transformers, which
does not know ``"rankwise"``, then stops with a size-mismatch error instead of loading
random weights; with rankwise the placeholders are ignored.

This module imports only transformers' quantizer base classes at import time (it is
imported while transformers registers its own quantizers); rankwise's layer code is
imported when a model is processed.
"""

from __future__ import annotations

import re
from typing import Any

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from rankwise.errors import RankwiseError

QUANT_METHOD = "rankwise"
FORMAT = "rankwise/2"
FORMAT_MAJOR = 2
#: ``transformers_weights`` value written into config.json by rankwise: plain transformers refuses it with this text
#: (it is not a safetensors file name); the rankwise quantizer removes it before transformers looks for weights.
REFUSAL = ("this-is-a-rankwise-checkpoint: pip install rankwise and `import rankwise` before from_pretrained "
           "(see quantization_config)")


def check_format(fmt: Any, where: str = "quantization_config") -> None:
    """Refuse a missing or newer format version (one line)."""
    if not isinstance(fmt, str) or not fmt.startswith("rankwise/"):
        raise RankwiseError(f"{where} has format {fmt!r}, not a rankwise checkpoint format (rankwise/N).")
    try:
        major = int(fmt.split("/", 1)[1].split(".")[0])
    except ValueError:
        raise RankwiseError(f"{where} has format {fmt!r}, which this rankwise cannot read.") from None
    if major > FORMAT_MAJOR:
        raise RankwiseError(f"{where} has format {fmt}, written by a newer rankwise; upgrade rankwise to load it.")


def check_layer_map(layers: Any, where: str = "quantization_config") -> dict[str, dict[str, Any]]:
    """A layer map must be {module name: spec dict with a string "type"} (shape checks happen in ``from_spec``)."""
    if not isinstance(layers, dict):
        raise RankwiseError(f"{where}.layers is {type(layers).__name__}, not a mapping of module names to layer specs; "
                            "the checkpoint metadata is corrupt.")
    for name, spec in layers.items():
        if not isinstance(name, str) or not name:
            raise RankwiseError(f"{where}.layers has a module name {name!r}; the checkpoint metadata is corrupt.")
        if not isinstance(spec, dict) or not isinstance(spec.get("type", "lowrank"), str):
            raise RankwiseError(f"{where}.layers[{name!r}] is not a layer spec; the checkpoint metadata is corrupt.")
    return layers


class RankwiseConfig(QuantizationConfigMixin):
    """``quantization_config`` of a rankwise checkpoint: the format version and the layer map."""

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, format: str = FORMAT,  # noqa: A002
                 quant_method: str = QUANT_METHOD, **kwargs: Any) -> None:
        check_format(format)
        self.quant_method = QUANT_METHOD
        self.format = FORMAT if format.split("/", 1)[1].split(".")[0] == str(FORMAT_MAJOR) else format
        self.layers = check_layer_map(dict(layers or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format": self.format,
                "layers": {k: dict(v) for k, v in self.layers.items()}}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _placeholder_pattern(names) -> str:
    return r"^(" + "|".join(re.escape(n) for n in names) + r")\.weight$"


class RankwiseHfQuantizer(HfQuantizer):
    """Rebuilds factorised layers in ``from_pretrained`` and marks them in ``save_pretrained`` (see module doc)."""

    requires_calibration = False
    quantization_config: RankwiseConfig

    def __init__(self, quantization_config: RankwiseConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update_attn_implementation(self, config):  # noqa: ANN001 - transformers' signature
        # the refusal marker is for plain transformers only: with rankwise the usual weight files are read
        if getattr(config, "transformers_weights", None) == REFUSAL:
            del config.transformers_weights
        return config

    def _process_model_before_weight_loading(self, model, **kwargs: Any):  # noqa: ANN001
        from rankwise.surgery.layers import build_layer
        from rankwise.surgery.targets import Target, is_matrix_module

        layers = self.quantization_config.layers
        for name, spec in layers.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise RankwiseError(
                    f"the checkpoint's layer map names {name!r}, which {type(model).__name__} does not have; "
                    "the checkpoint belongs to another architecture."
                ) from None
            if not is_matrix_module(old):
                raise RankwiseError(f"the checkpoint's layer map names {name!r}, which is a {type(old).__name__}, "
                                    "not a linear layer.")
            m, n = Target(name, old).shape
            if spec.get("in_features", n) != n or spec.get("out_features", m) != m:
                raise RankwiseError(
                    f"the layer map gives {name} {spec.get('out_features')}×{spec.get('in_features')}, but the "
                    f"config makes it {m}×{n}; the checkpoint does not match its config.json."
                )
            w = old.weight
            new = build_layer(name, {"in_features": n, "out_features": m, **spec}, dtype=w.dtype, device=w.device)
            model.set_submodule(name, new, strict=True)
        if layers:
            pattern = _placeholder_pattern(layers)
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {pattern}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):  # noqa: ANN001
        # factorised layers are ordinary float modules: .half()/.float(), dtype casts and full fine-tuning
        # (which transformers refuses for "quantized" models) stay allowed
        model.is_quantized = False
        return model

    def get_state_dict_and_metadata(self, model):  # noqa: ANN001
        """The state dict to save: the model's own plus a placeholder per factorised layer; refreshes the layer map."""
        from rankwise.surgery.layers import layer_map

        self.quantization_config.layers = layer_map(model)
        return state_dict_with_placeholders(model, self.quantization_config.layers), {}

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # a factorised model is an ordinary float model: full fine-tuning (Trainer) of its factors is allowed
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def state_dict_with_placeholders(model, layers) -> dict[str, Any]:  # noqa: ANN001
    """``model.state_dict()`` plus an empty ``name.weight`` tensor for every factorised layer ``name``."""
    import torch

    state = model.state_dict()
    for name in layers:
        key = f"{name}.weight"
        if key not in state:
            ref = state.get(f"{name}.A.weight")
            state[key] = torch.empty(0, dtype=ref.dtype if ref is not None else torch.float32)
    return state


def _register_self() -> None:
    from rankwise.io.hf_integration import register

    register()


_register_self()
