"""``rankwise.evaluation.evaluate``: perplexity, size and (optionally) speed of one or several models.

All models are loaded into this one process and measured side by side: perplexity on the
same windows, speed alternately (A B C, C B A, ...) so machine noise hits all alike. With
``config.compare`` a reference model is added and the ratios model / compare reported; with
``config.plot`` the picture of perplexity against size and speed is drawn. The result is the
JSON ``rankwise eval`` writes (keys in docs/eval.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from rankwise.config import check_config_type
from rankwise.errors import RankwiseError
from rankwise.evaluation.config import EvalConfig


def labels_for(n_models: int, compare: bool) -> list[str]:
    """``model`` for the first model, ``model_2``, ``model_3``… for the others, ``compare`` last."""
    return ["model"] + [f"model_{i}" for i in range(2, n_models + 1)] + (["compare"] if compare else [])


def evaluate(models: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
             config: EvalConfig | None = None) -> dict[str, Any]:
    """Measure ``models`` (names or folders; default the built-in model) as ``config`` says; returns the JSON dict."""
    from rankwise.engine.threads import torch_threads

    cfg = check_config_type(config, EvalConfig, "rankwise.evaluation.evaluate")
    if models is None:
        names = ["smollm2-135m"]
    elif isinstance(models, (str, os.PathLike)):
        names = [str(models)]
    else:
        names = [str(m) for m in models]
    if not names:
        raise RankwiseError("eval needs at least one model.")
    with torch_threads(cfg.threads):
        return _evaluate(names, cfg)


def _evaluate(names: list[str], cfg: EvalConfig) -> dict[str, Any]:
    import torch

    from rankwise import __version__
    from rankwise.engine.device import dtype_name, resolve_device
    from rankwise.evaluation.cost_model import slow_layers
    from rankwise.evaluation.models import load_for_eval
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.evaluation.report import size_report
    from rankwise.io.texts import load_text

    t_start = time.time()
    device = resolve_device(cfg.device)
    texts = {spec: load_text(spec, "test") for spec in cfg.text}  # unknown text fails before any model loads
    all_names = names + ([cfg.compare] if cfg.compare else [])
    labels = labels_for(len(names), cfg.compare is not None)
    loaded = {}
    from rankwise.progress import progress

    for lab, name in zip(labels, progress(all_names, desc="loading", unit="model", enabled=len(all_names) > 1)):
        loaded[lab] = load_for_eval(name, device, cfg.dtype, cfg.device_map, cfg.max_memory)

    entries: dict[str, dict[str, Any]] = {}
    for lab in labels:
        lm = loaded[lab]
        meta = getattr(lm.model, "rankwise_meta", None) or {}
        entries[lab] = {
            "label": lab,
            "model": lm.name,
            "path": str(lm.path),
            "kind": lm.kind,
            "compression": {k: v for k, v in meta.items() if k not in ("layers", "ranks")} or None,
            "size": size_report(lm.model, lm.path).to_dict(),
            "slow_layers": {"prefill": sorted(slow_layers(lm.model, tokens=512)),
                            "decode": sorted(slow_layers(lm.model, tokens=1))},
            "perplexity": {},
            "speed": None,
            "dtype": dtype_name(lm.dtype),
            "placement": lm.placement,
        }

    for spec, text in texts.items():
        for lab in labels:
            lm = loaded[lab]
            res = perplexity(lm.model, lm.tokenizer, text, seq_len=cfg.seq_len, max_tokens=cfg.tokens,
                             name=f"{spec} ({lab})" if len(labels) > 1 else spec, progress=True)
            d = res.to_dict()
            d["text"] = spec
            entries[lab]["perplexity"][spec] = d

    speed_settings = None
    if cfg.speed:
        from rankwise.evaluation.speed import measure_speed, prompt_ids

        first = cfg.text[0]
        ids = prompt_ids(loaded[labels[0]].tokenizer, texts[first], cfg.prompt_tokens, name=first)
        res = measure_speed({lab: loaded[lab].model for lab in labels}, ids, new_tokens=cfg.new_tokens,
                            repeats=cfg.repeats, warmup=cfg.warmup, progress=True)
        for lab in labels:
            entries[lab]["speed"] = res[lab].to_dict()
        speed_settings = {"prompt_text": first, "prompt_tokens": int(ids.shape[1]), "new_tokens": cfg.new_tokens,
                          "repeats": cfg.repeats, "warmup": cfg.warmup, "statistic": "median"}

    out: dict[str, Any] = {
        "rankwise_version": __version__,
        "settings": {"texts": list(cfg.text), "split": "test", "tokens": cfg.tokens, "seq_len": cfg.seq_len,
                     "speed": speed_settings, "threads": torch.get_num_threads(),
                     "device": str(device) if cfg.device_map is None else None, "device_map": cfg.device_map,
                     "max_memory": {str(k): v for k, v in cfg.max_memory.items()} if cfg.max_memory else None,
                     "dtype": cfg.dtype if isinstance(cfg.dtype, str) else dtype_name(cfg.dtype)},
        "models": [entries[lab] for lab in labels],
        "comparison": comparison(entries) if cfg.compare else None,
        "plot": None,
        "seconds": None,
    }
    if cfg.plot:
        from rankwise.evaluation.plot import plot_models

        plot_models(out["models"], cfg.text[0], cfg.plot)
        out["plot"] = str(cfg.plot)
    out["seconds"] = round(time.time() - t_start, 2)
    return out


def comparison(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios model / compare (e.g. compressed / dense): perplexity, parameters, bytes, speed."""
    a, b = entries["model"], entries["compare"]

    def ratio(x: float | None, y: float | None) -> float | None:
        return None if x is None or y in (None, 0) else x / y

    cmp: dict[str, Any] = {
        "perplexity_ratio": {t: ratio(a["perplexity"][t]["perplexity"], b["perplexity"][t]["perplexity"])
                             for t in a["perplexity"]},
        "params_ratio": ratio(a["size"]["params"], b["size"]["params"]),
        "disk_bytes_ratio": ratio(a["size"]["disk_bytes"], b["size"]["disk_bytes"]),
        "prefill_speedup": None,
        "decode_speedup": None,
    }
    if a["speed"] and b["speed"]:
        cmp["prefill_speedup"] = ratio(a["speed"]["prefill_tokens_per_s"], b["speed"]["prefill_tokens_per_s"])
        cmp["decode_speedup"] = ratio(a["speed"]["decode_tokens_per_s"], b["speed"]["decode_tokens_per_s"])
    return cmp
