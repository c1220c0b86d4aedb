"""Register rankwise's checkpoint format with transformers, cheaply and exactly once.

``import rankwise`` calls :func:`install`, which imports nothing heavy: when
transformers' quantizer registry (``transformers.quantizers.auto``) is already
imported it registers at once; otherwise it leaves a one-shot import hook that
registers right after transformers imports that module (which it does before any
``from_pretrained``). Code that needs the registration now (``rankwise.load``,
``rankwise.save``, ``compress``) calls :func:`register` directly.

Registration uses transformers' public extension points,
``transformers.quantizers.register_quantization_config`` and
``register_quantizer``, under the name ``"rankwise"`` (see :mod:`rankwise.io.hf_quantizer`).
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

QUANT_METHOD = "rankwise"
_TARGET = "transformers.quantizers.auto"


def register() -> None:
    """Make ``quant_method: "rankwise"`` known to transformers (idempotent; imports transformers)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    mod = sys.modules.get("rankwise.io.hf_quantizer")
    if mod is not None and not hasattr(mod, "RankwiseHfQuantizer"):
        return  # reached from inside that module's own import: it calls register() again when it is complete
    from rankwise.io.hf_quantizer import RankwiseConfig, RankwiseHfQuantizer

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(RankwiseConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(RankwiseHfQuantizer)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec):  # noqa: ANN001 - importlib protocol
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self.inner.exec_module(module)
        _remove_hook()
        register()


class _Hook(importlib.abc.MetaPathFinder):
    """Registers rankwise with transformers right after ``transformers.quantizers.auto`` is imported."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Hook)]


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it gets imported (no heavy import)."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
