"""``SelectLinear``: a linear layer that keeps some rows and/or columns of a dense one (MoDeGPT's layers).

A dense layer ``W`` (out×in) is replaced by ``weight`` (rows×cols), the block of a matrix
``W'`` of the same out×in shape that is zero outside the rows ``out_index`` and the columns
``in_index``:

* ``scatter_out=True``: the layer still returns ``out_features`` values, zeros outside
  ``out_index`` (MoDeGPT's query/key rows and value rank slots, so the HF attention code
  keeps ``head_dim``); ``scatter_out=False``: it returns only the ``rows`` kept values
  (MoDeGPT's gate/up rows: the MLP's intermediate width shrinks);
* ``gather_in=True``: it takes ``in_features`` inputs and reads the ``in_index`` ones
  (o_proj reading the kept value slots); ``gather_in=False``: it takes the ``cols``
  compact inputs (down_proj after the compact gate/up).

:meth:`to_dense` gives the ``nn.Linear(in_features, out_features)`` holding ``W'``: replacing
*every* SelectLinear of a model at once gives the same function (a compact gate/up becomes a
full-width one whose extra rows are zero, and the matching down_proj's extra columns are zero).
No library layer stores a row/column subset with scatter/gather semantics (torch.nn has none,
peft/torchao quantise or adapt dense weights), so this one is written here.
State-dict keys: ``weight`` (rows×cols), ``bias`` (rows), ``out_index`` / ``in_index`` (int64).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rankwise.errors import RankwiseError


def _count(spec: dict[str, Any], key: str, where: str, hi: int | None = None) -> int:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (hi is not None and v > hi):
        bound = f" ≤ {hi}" if hi is not None else ""
        raise RankwiseError(f"{where}: {key} must be a whole number ≥ 1{bound}, got {v!r}; the layer map is corrupt.")
    return v


class SelectLinear(nn.Module):
    """Rows ``out_index`` × columns ``in_index`` of a dense ``out_features × in_features`` layer (see module doc)."""

    #: name of this layer type in :data:`rankwise.surgery.layers.LAYER_TYPES`
    layer_type = "select"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rows: int,
        cols: int,
        *,
        select_out: bool,
        select_in: bool,
        scatter_out: bool = True,
        gather_in: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not select_out and rows != out_features:
            raise ValueError(f"rows ({rows}) must equal out_features ({out_features}) without a row selection")
        if not select_in and cols != in_features:
            raise ValueError(f"cols ({cols}) must equal in_features ({in_features}) without a column selection")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.scatter_out = bool(scatter_out and select_out)
        self.gather_in = bool(gather_in and select_in)
        self.weight = nn.Parameter(torch.empty(rows, cols, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(rows, device=device, dtype=dtype)) if bias else None
        self.out_index: torch.Tensor | None
        self.in_index: torch.Tensor | None
        self.register_buffer("out_index", torch.empty(rows, dtype=torch.long, device=device) if select_out else None)
        self.register_buffer("in_index", torch.empty(cols, dtype=torch.long, device=device) if select_in else None)

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def cols(self) -> int:
        return self.weight.shape[1]

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
        out_features: int,
        out_index: torch.Tensor | None = None,
        in_index: torch.Tensor | None = None,
        scatter_out: bool = True,
        gather_in: bool = True,
        dtype: torch.dtype | None = None,
    ) -> SelectLinear:
        """A layer holding ``weight`` (rows×cols) at rows ``out_index`` and columns ``in_index`` of the dense shape."""
        dtype = dtype or weight.dtype
        layer = cls(in_features, out_features, weight.shape[0], weight.shape[1], select_out=out_index is not None,
                    select_in=in_index is not None, scatter_out=scatter_out, gather_in=gather_in,
                    bias=bias is not None, device=weight.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias)
            for idx, buf, size in ((out_index, layer.out_index, out_features), (in_index, layer.in_index, in_features)):
                if idx is None or buf is None:
                    continue
                idx = idx.to(device=weight.device, dtype=torch.long)
                bad = idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= size
                if bad or idx.unique().numel() != idx.numel():
                    raise RuntimeError("rankwise bug: SelectLinear indices must be distinct and inside the dense shape")
                buf.copy_(idx)
        layer.requires_grad_(False)
        return layer

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> SelectLinear:
        """An empty layer of the shape ``spec`` describes (tensors and indices come from the state dict)."""
        where = f"layer {spec.get('name', '?')}"
        n = _count(spec, "in_features", where)
        m = _count(spec, "out_features", where)
        rows = _count(spec, "rows", where, m)
        cols = _count(spec, "cols", where, n)
        flags = {}
        for key in ("select_out", "select_in", "scatter_out", "gather_in", "bias"):
            v = spec.get(key, False)
            if not isinstance(v, bool):
                raise RankwiseError(f"{where}: {key} must be true or false, got {v!r}; the layer map is corrupt.")
            flags[key] = v
        try:
            return cls(n, m, rows, cols, device=device, dtype=dtype, **flags)
        except ValueError as exc:
            raise RankwiseError(f"{where}: {exc}; the layer map is corrupt.") from None

    def spec(self) -> dict[str, Any]:
        """What :meth:`from_spec` needs to rebuild this layer (stored in rankwise.json and config.json)."""
        return {"type": self.layer_type, "in_features": self.in_features, "out_features": self.out_features,
                "rows": self.rows, "cols": self.cols, "select_out": self.out_index is not None,
                "select_in": self.in_index is not None, "scatter_out": self.scatter_out,
                "gather_in": self.gather_in, "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather_in and self.in_index is not None:
            x = x.index_select(-1, self.in_index)
        y = F.linear(x, self.weight, self.bias)
        if self.scatter_out and self.out_index is not None:
            out = y.new_zeros(*y.shape[:-1], self.out_features)
            return out.index_copy_(-1, self.out_index, y)
        return y

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The out_features × in_features matrix W' (zeros outside the kept rows and columns)."""
        dt = dtype or self.weight.dtype
        W = torch.zeros(self.out_features, self.in_features, dtype=dt, device=self.weight.device)
        rows = self.out_index if self.out_index is not None else torch.arange(self.out_features, device=W.device)
        cols = self.in_index if self.in_index is not None else torch.arange(self.in_features, device=W.device)
        W[rows[:, None], cols[None, :]] = self.weight.to(dt)
        return W

    def dense_bias(self) -> torch.Tensor | None:
        """The out_features bias (zeros outside the kept rows), or None."""
        if self.bias is None:
            return None
        if self.out_index is None:
            return self.bias.detach().clone()
        b = torch.zeros(self.out_features, dtype=self.bias.dtype, device=self.bias.device)
        b[self.out_index] = self.bias.detach()
        return b

    def to_dense(self) -> nn.Linear:
        """``nn.Linear(in_features, out_features)`` holding W' (exact when every SelectLinear is densified)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if lin.bias is not None:
                lin.bias.copy_(self.dense_bias())
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}, "
                f"cols={self.cols}, scatter_out={self.scatter_out}, gather_in={self.gather_in}, "
                f"bias={self.bias is not None}")


def dense_select_tensors(spec: dict[str, Any], get: Any) -> dict[str, torch.Tensor]:
    """{"weight": W', "bias": b'} of a stored SelectLinear; ``get(key)`` reads ``weight``/``bias``/``*_index``.

    Used by the streamed dense export (one layer in memory at a time).
    """
    w = get("weight")
    layer = SelectLinear.from_spec(spec, dtype=w.dtype, device="cpu")
    state = {k: get(k) for k in layer.state_dict()}
    layer.load_state_dict(state)
    out = {"weight": layer.dense_weight()}
    if layer.bias is not None:
        out["bias"] = layer.dense_bias()
    return out
