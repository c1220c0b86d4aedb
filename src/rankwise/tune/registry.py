"""Adapter registry: method name → layer factory (native) or PEFT builder (aliases: ``welore_lrc``).

Native methods register an :class:`~rankwise.tune.base.AdapterLayer` factory
``(base, config, name, state=None) -> nn.Module``; PEFT-backed methods register
a :class:`~rankwise.tune.peft_backend.PeftMethod`. ``ADAPTERS.names()`` feeds
the ``--method`` choices of ``rankwise tune`` without importing either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rankwise.errors import RankwiseError
from rankwise.registry import Registry

_ALIASES = {"welore_lrc": "welore-lrc", "welore": "welore-lrc", "lora_xs": "lora-xs", "loraxs": "lora-xs",
            "lora_ga": "lora-ga", "loraga": "lora-ga"}

NATIVE_METHODS: tuple[str, ...] = ("lora", "pissa", "svfit", "salt", "sorsa", "loldu", "lora-xs", "lora-ga",
                                   "dylora", "welore-lrc", "heal")
"""Adapters rankwise implements itself (the spectral / seed methods no library packages)."""

PEFT_METHODS: tuple[str, ...] = ("dora", "adalora", "eva", "olora", "corda", "loftq")
"""Adapters built through PEFT (``peft.get_peft_model``), with rankwise's CLI, data, save/load around them."""

METHODS: tuple[str, ...] = NATIVE_METHODS + PEFT_METHODS
"""Every adapter rankwise.tune offers."""

PEFT_EXPORTABLE: tuple[str, ...] = ("lora", "pissa", "lora-ga") + PEFT_METHODS
"""Adapters that ``export_peft`` writes in PEFT's own format (native ones as an exact LoRA on the original W)."""

LOWRANK_METHODS: tuple[str, ...] = ("welore-lrc", "heal")
"""Adapters that act on the LowRankLinear layers of a compressed model."""

DATA_INIT_METHODS: tuple[str, ...] = ("lora-ga", "eva", "corda")
"""Adapters whose initialisation needs training / calibration batches."""


def _load_builtin() -> None:
    from rankwise.tune.dylora import DyLoRALayer
    from rankwise.tune.heal import heal_layer
    from rankwise.tune.loldu import LoLDULayer
    from rankwise.tune.lora import LoRALayer
    from rankwise.tune.loraga import LoRAGALayer
    from rankwise.tune.loraxs import LoRAXSLayer
    from rankwise.tune.peft_backend import PEFT_BUILDERS
    from rankwise.tune.pissa import PiSSALayer
    from rankwise.tune.salt import SALTLayer
    from rankwise.tune.sorsa import SORSALayer
    from rankwise.tune.svfit import SVFitLayer
    from rankwise.tune.welore_lrc import FactorLayer

    for name, obj in (("lora", LoRALayer), ("pissa", PiSSALayer), ("svfit", SVFitLayer), ("salt", SALTLayer),
                      ("sorsa", SORSALayer), ("loldu", LoLDULayer), ("lora-xs", LoRAXSLayer),
                      ("lora-ga", LoRAGALayer), ("dylora", DyLoRALayer), ("welore-lrc", FactorLayer),
                      ("heal", heal_layer), *PEFT_BUILDERS.items()):
        ADAPTERS.register(name, obj)


ADAPTERS: Registry[Any] = Registry("adapter method", loader=_load_builtin, builtin=METHODS)
"""name → layer factory (native) or PeftMethod (PEFT-backed)."""


def canonical_method(name: str) -> str:
    """The canonical name of ``name``; a one-line error listing the methods when unknown."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in ADAPTERS:
        raise RankwiseError(f"unknown adapter method {name!r}; choose one of: {', '.join(ADAPTERS.names())}.")
    return key


def is_peft_method(method: str) -> bool:
    """True for methods built through PEFT."""
    return canonical_method(method) in PEFT_METHODS


def layer_factory(method: str) -> Callable[..., Any]:
    """The constructor ``(base, config, name, state=None) -> AdapterLayer`` of a native ``method``."""
    method = canonical_method(method)
    if method in PEFT_METHODS:
        raise RankwiseError(f"{method} is built through PEFT, not by a rankwise layer factory.")
    return ADAPTERS.get(method)
