"""``rankwise.tune``: spectral adapters (docs/methods.md §4) with merge, save/load and PEFT export.

Usage::

    from rankwise.tune import AdapterConfig, apply, merge, save_adapter
    apply(model, AdapterConfig(method="pissa", rank=8, targets="q_proj|v_proj"))
    ...train (only adapter parameters require grad)...
    save_adapter(model, "out/adapter")     # adapter.safetensors + rankwise_adapter.json
    export_peft(model, "out/peft")         # lora / pissa: loads with peft.PeftModel.from_pretrained

Methods (see :data:`METHODS`): native lora, pissa, svfit, salt, sorsa, loldu,
lora-xs, lora-ga, dylora, welore-lrc, heal; through PEFT dora, adalora, eva,
olora, corda, loftq (``apply`` then returns the ``peft.PeftModel``).
``regularization_loss(model)`` returns SORSA's orthogonality term (0 for the
others); the trainer (:mod:`rankwise.training`) adds it to the task loss.
"""

from rankwise.tune.api import (
    ADAPTER_FILE,
    META_FILE,
    adapter_layers,
    adapter_summary,
    apply,
    base_fingerprint,
    check_fingerprint,
    closed_form_trainable,
    export_peft,
    load_adapter,
    merge,
    merge_and_unload,
    read_adapter_meta,
    regularization_loss,
    save_adapter,
    set_eval_rank,
    trainable_parameters,
    unload,
    unmerge,
)
from rankwise.tune.base import AdapterLayer
from rankwise.tune.config import AdapterConfig
from rankwise.tune.peft_backend import is_peft_model, load_peft_adapter
from rankwise.tune.registry import (
    ADAPTERS,
    LOWRANK_METHODS,
    METHODS,
    NATIVE_METHODS,
    PEFT_EXPORTABLE,
    PEFT_METHODS,
    canonical_method,
    layer_factory,
)

__all__ = [
    "ADAPTERS",
    "ADAPTER_FILE",
    "NATIVE_METHODS",
    "PEFT_METHODS",
    "check_fingerprint",
    "is_peft_model",
    "load_peft_adapter",
    "set_eval_rank",
    "LOWRANK_METHODS",
    "METHODS",
    "META_FILE",
    "PEFT_EXPORTABLE",
    "AdapterConfig",
    "AdapterLayer",
    "adapter_layers",
    "adapter_summary",
    "apply",
    "base_fingerprint",
    "canonical_method",
    "closed_form_trainable",
    "export_peft",
    "layer_factory",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "read_adapter_meta",
    "regularization_loss",
    "save_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
