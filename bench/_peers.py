"""Access to peer implementations used by tests and benchmarks (optional dependencies; kept out of the package).

``galore-torch==1.0``'s ``__init__`` imports its 8-bit optimiser, which needs
``bitsandbytes`` (a CUDA library). :func:`galore_torch_adamw` loads only the
32-bit ``GaLoreAdamW`` and its projector, without that import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from rankwise.errors import RankwiseError


def galore_torch_adamw() -> type:
    """``galore_torch.GaLoreAdamW`` (the reference GaLore optimiser) without importing bitsandbytes."""
    mod = sys.modules.get("galore_torch")
    if mod is not None and hasattr(mod, "GaLoreAdamW"):
        return mod.GaLoreAdamW
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        raise RankwiseError("the peer optimiser needs `pip install --no-deps galore-torch==1.0`.")
    if mod is None:
        pkg = types.ModuleType("galore_torch")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["galore_torch"] = pkg
        mod = pkg
    adamw = importlib.import_module("galore_torch.adamw")
    mod.GaLoreAdamW = adamw.AdamW  # type: ignore[attr-defined]
    return adamw.AdamW
