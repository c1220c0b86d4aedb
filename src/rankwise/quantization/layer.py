"""``QuantLinear``: a linear layer whose weight is stored packed at 2/3/4/8 bits, plus an optional EoRA path.

Stored tensors (all in the state dict, hence in safetensors, as real bytes):

* ``qweight``: uint8, the m×n codes packed at ``bits`` bits (:mod:`rankwise.quantization.pack`);
* ``scales``: float16, m × groups; ``qzeros``: uint8, the m × groups zero points packed at ``bits`` bits;
* ``bias`` (optional) and the EoRA factors ``eora_A`` (r×n) and ``eora_B`` (m×r) in the model's dtype.

Forward: y = Ŵ x + b + B (A x), where Ŵ = (q − z)·s is dequantised one layer at a
time, on the fly, and dropped after the matmul (memory stays that of the packed
weights). With bfloat16 or float16 activations and 4 bits the matmul runs in
PyTorch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``, the kernel behind
torchao's int4 weight-only CPU layout), which reads the packed codes directly;
in float32 that kernel is ~70× slower than dequantise + matmul on CPU, so float32
uses the latter (measured with torch 2.13, see docs/quantize.md).

``QuantLowRank`` holds a low-rank layer whose two factors were quantised
(``rankwise quantize`` on a ``rankwise compress`` output): y = B(A x) + b with A and
B both :class:`QuantLinear`. ``QuantSelect`` holds a MoDeGPT layer
(:class:`~rankwise.surgery.select.SelectLinear`, ``--method modegpt``) whose kept
rows × columns block was quantised: gather the kept inputs, apply the inner
:class:`QuantLinear`, scatter to the kept outputs — the same indices and flags as the
SelectLinear it replaces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.quantization.pack import check_bits, pack, packed_size, unpack
from rankwise.quantization.rtn import QuantizedWeight, dequantize, num_groups
from rankwise.surgery.targets import Conv1D

__all__ = ["QuantLinear", "QuantLowRank", "QuantSelect"]


class QuantLinear(nn.Module):
    """y = Ŵ x + b (+ B A x): Ŵ stored as packed ``bits``-bit codes with per-group float16 scales and zero points."""

    #: name of this layer type in :data:`rankwise.surgery.layers.LAYER_TYPES`
    layer_type = "quant"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 eora_rank: int = 0, kind: str = "linear", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_bits(bits)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size, self.kind = bits, int(group_size), kind
        m, n, G = self.out_features, self.in_features, num_groups(in_features, group_size)
        dtype = dtype or torch.float32
        self.register_buffer("qweight", torch.zeros(packed_size(m * n, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(m, G, dtype=torch.float16, device=device))
        self.register_buffer("qzeros", torch.zeros(packed_size(m * G, bits), dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(m, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.eora_rank = int(eora_rank)
        if eora_rank:
            self.eora_A = nn.Parameter(torch.zeros(eora_rank, n, dtype=dtype, device=device))
            self.eora_B = nn.Parameter(torch.zeros(m, eora_rank, dtype=dtype, device=device))
        else:
            self.eora_A = self.eora_B = None
        self._dtype = dtype
        self._int4: tuple | None = None  # (dtype, packed int4 weight, scales_and_zeros) for the CPU kernel

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None = None, kind: str = "linear",
                       dtype: torch.dtype | None = None) -> QuantLinear:
        """Wrap the codes, scales and zero points of one matrix (m×n) into a layer."""
        m, n = q.codes.shape
        layer = cls(n, m, q.bits, q.group_size, bias=bias is not None, kind=kind, dtype=dtype,
                    device=q.codes.device)
        with torch.no_grad():
            layer.qweight.copy_(pack(q.codes, q.bits))
            layer.scales.copy_(q.scales)
            layer.qzeros.copy_(pack(q.zeros, q.bits))
            if bias is not None:
                layer.bias.copy_(bias.detach().to(layer.bias.dtype))
        return layer

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> QuantLinear:
        """An empty layer of the shape ``spec`` describes (its tensors come from the state dict)."""
        try:
            return cls(int(spec["in_features"]), int(spec["out_features"]), int(spec["bits"]), int(spec["group_size"]),
                       bias=bool(spec.get("bias")), eora_rank=int(spec.get("eora_rank", 0)),
                       kind=spec.get("kind", "linear"), device=device, dtype=dtype)
        except (KeyError, TypeError, ValueError) as exc:
            raise RankwiseError(f"quantised layer spec {spec} is incomplete ({exc}); write the checkpoint again.") \
                from exc

    def spec(self) -> dict[str, Any]:
        """What :meth:`from_spec` needs to rebuild this layer (stored in rankwise.json)."""
        return {"type": "quant", "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "bias": self.bias is not None,
                "eora_rank": self.eora_rank, "kind": self.kind}

    @torch.no_grad()
    def set_eora(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """Attach (or replace) the EoRA residual factors B (m×r) and A (r×n)."""
        m, n = self.out_features, self.in_features
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
            raise RankwiseError(f"EoRA factors B {tuple(B.shape)} and A {tuple(A.shape)} do not fit a {m}×{n} layer.")
        dt = self.bias.dtype if self.bias is not None else self._dtype
        self.eora_rank = int(A.shape[0])
        self.eora_A = nn.Parameter(A.detach().to(device=self.qweight.device, dtype=dt).clone())
        self.eora_B = nn.Parameter(B.detach().to(device=self.qweight.device, dtype=dt).clone())

    # -- maths -----------------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The m×n integer codes (uint8)."""
        return unpack(self.qweight, self.bits, self.out_features * self.in_features).reshape(
            self.out_features, self.in_features)

    def zeros(self) -> torch.Tensor:
        """The m×groups zero points (uint8)."""
        G = self.scales.shape[1]
        return unpack(self.qzeros, self.bits, self.out_features * G).reshape(self.out_features, G)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ = (q − z)·s, m×n (without the EoRA path)."""
        return dequantize(self.codes(), self.scales, self.zeros(), self.group_size, dtype)

    @torch.no_grad()
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ + B A, m×n, in ``dtype`` (default: the layer's floating dtype)."""
        dt = dtype or (self.eora_A.dtype if self.eora_A is not None else
                       self.bias.dtype if self.bias is not None else self._dtype)
        w = self.dequantize(torch.float32)
        if self.eora_A is not None:
            w = w + self.eora_B.float() @ self.eora_A.float()
        return w.to(dt)

    def _int4_kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        """The int4 CPU kernel (bf16/fp16 inputs, 4 bits, groups of ≥ 32 columns); None where it does not apply."""
        if (self.bits != 4 or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16)
                or self.in_features % self.group_size or self.group_size < 32 or self.in_features % 32):
            return None
        op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
        if op is None:
            return None
        key = (x.dtype, self.qweight.data_ptr(), self.qweight._version, self.scales._version, self.qzeros._version)
        if self._int4 is None or self._int4[0] != key:
            # the kernel computes (q − 8)·s + m per group; ours is (q − z)·s, so m = (8 − z)·s
            s = self.scales.to(torch.float32)
            mins = (8.0 - self.zeros().to(torch.float32)) * s
            sz = torch.stack([s, mins], dim=-1).transpose(0, 1).contiguous().to(x.dtype)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
            self._int4 = (key, packed, sz)
        _, packed, sz = self._int4
        flat = x.reshape(-1, self.in_features)
        return op(flat.contiguous(), packed, self.group_size, sz).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._int4_kernel(x)
        if y is None:
            y = F.linear(x, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.eora_A is not None:
            y = y + F.linear(F.linear(x, self.eora_A.to(x.dtype)), self.eora_B.to(x.dtype))
        return y

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``, if that is what was replaced) holding Ŵ + B A."""
        w = self.dense_weight()
        if self.kind == "conv1d" and Conv1D:
            layer = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
            layer.weight.copy_(w.T)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
            else:
                layer.bias.zero_()
            return layer
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                          dtype=w.dtype)
        layer.weight.copy_(w)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    @property
    def storage_bytes(self) -> int:
        """Bytes of every stored tensor of this layer."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), *self.parameters()))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, eora_rank={self.eora_rank}")


class QuantLowRank(nn.Module):
    """A low-rank layer y = B(A x) + b whose factors ``A`` (in→rank) and ``B`` (rank→out) are quantised.

    ``A`` and ``B`` are :class:`QuantLinear` (or plain ``nn.Linear`` before quantisation);
    the bias, if any, lives in ``B``.
    """

    layer_type = "quant_lowrank"

    def __init__(self, A: nn.Module, B: nn.Module, kind: str = "linear") -> None:
        super().__init__()
        self.A, self.B, self.kind = A, B, kind
        self.in_features, self.rank, self.out_features = A.in_features, A.out_features, B.out_features

    @classmethod
    def from_lowrank(cls, layer: nn.Module) -> QuantLowRank:
        """Split a ``LowRankLinear`` into two ``nn.Linear`` (A without bias, B with the bias), ready to quantise."""
        a_w = layer.A.weight if isinstance(layer.A, nn.Module) else layer.A
        b_w = layer.B.weight if isinstance(layer.B, nn.Module) else layer.B
        bias = layer.B.bias if isinstance(layer.B, nn.Module) else layer.bias
        k, n = a_w.shape
        m = b_w.shape[0]
        A = nn.Linear(n, k, bias=False, dtype=a_w.dtype, device=a_w.device)
        B = nn.Linear(k, m, bias=bias is not None, dtype=b_w.dtype, device=b_w.device)
        with torch.no_grad():
            A.weight.copy_(a_w)
            B.weight.copy_(b_w)
            if bias is not None:
                B.bias.copy_(bias)
        return cls(A, B, kind=getattr(layer, "orig_kind", "linear"))

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> QuantLowRank:
        try:
            return cls(QuantLinear.from_spec(spec["A"], dtype, device), QuantLinear.from_spec(spec["B"], dtype, device),
                       kind=spec.get("kind", "linear"))
        except KeyError as exc:
            raise RankwiseError(f"quantised low-rank spec lacks {exc}; write the checkpoint again.") from exc

    def spec(self) -> dict[str, Any]:
        if not (isinstance(self.A, QuantLinear) and isinstance(self.B, QuantLinear)):
            raise RankwiseError("QuantLowRank.spec: the factors are not quantised yet.")
        return {"type": "quant_lowrank", "rank": self.rank, "in_features": self.in_features,
                "out_features": self.out_features, "kind": self.kind, "A": self.A.spec(), "B": self.B.spec()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @torch.no_grad()
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        def w(mod: nn.Module) -> torch.Tensor:
            return mod.dense_weight(torch.float32) if isinstance(mod, QuantLinear) else mod.weight.float()

        out = w(self.B) @ w(self.A)
        return out.to(dtype or torch.float32)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        bias = self.B.bias
        w = self.dense_weight(bias.dtype if bias is not None else torch.float32)
        if self.kind == "conv1d" and Conv1D:
            layer = Conv1D(self.out_features, self.in_features).to(dtype=w.dtype)
            layer.weight.copy_(w.T)
            layer.bias.copy_(bias) if bias is not None else layer.bias.zero_()
            return layer
        layer = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=w.dtype)
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class QuantSelect(nn.Module):
    """A MoDeGPT ``SelectLinear`` whose kept block (rows × cols) lives in ``inner``, a :class:`QuantLinear`.

    ``inner`` is a plain ``nn.Linear(cols, rows)`` between :meth:`from_select` and quantisation
    (it is what the calibration statistics are collected on: the gathered, compact inputs).
    Forward, :meth:`dense_weight` and :meth:`to_dense` follow ``SelectLinear``: the out×in matrix
    is zero outside rows ``out_index`` and columns ``in_index``. State-dict keys: ``inner.*``
    (the packed tensors, bias and EoRA factors), ``out_index`` / ``in_index`` (int64).
    """

    layer_type = "quant_select"

    def __init__(self, inner: nn.Module, in_features: int, out_features: int, *, select_out: bool, select_in: bool,
                 scatter_out: bool = True, gather_in: bool = True) -> None:
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.scatter_out = bool(scatter_out and select_out)
        self.gather_in = bool(gather_in and select_in)
        dev = next((t.device for t in (*inner.parameters(), *inner.buffers())), None)
        self.out_index: torch.Tensor | None
        self.in_index: torch.Tensor | None
        self.register_buffer("out_index", torch.empty(inner.out_features, dtype=torch.long, device=dev)
                             if select_out else None)
        self.register_buffer("in_index", torch.empty(inner.in_features, dtype=torch.long, device=dev)
                             if select_in else None)

    @property
    def rows(self) -> int:
        return int(self.inner.out_features)

    @property
    def cols(self) -> int:
        return int(self.inner.in_features)

    @classmethod
    def from_select(cls, layer: nn.Module) -> QuantSelect:
        """Move a ``SelectLinear``'s block and bias into an ``nn.Linear(cols, rows)`` (ready to quantise)."""
        w = layer.weight
        inner = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, dtype=w.dtype, device=w.device)
        out = cls(inner, layer.in_features, layer.out_features, select_out=layer.out_index is not None,
                  select_in=layer.in_index is not None, scatter_out=layer.scatter_out, gather_in=layer.gather_in)
        with torch.no_grad():
            inner.weight.copy_(w)
            if layer.bias is not None:
                inner.bias.copy_(layer.bias)
            for mine, theirs in ((out.out_index, layer.out_index), (out.in_index, layer.in_index)):
                if mine is not None:
                    mine.copy_(theirs)
        inner.requires_grad_(False)
        return out

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> QuantSelect:
        """An empty layer of the shape ``spec`` describes (tensors and indices come from the state dict)."""
        where = f"layer {spec.get('name', '?')}"
        inner = spec.get("inner")
        if not isinstance(inner, dict):
            raise RankwiseError(f"{where}: the quantised MoDeGPT spec lacks its 'inner' layer; write the checkpoint "
                                "again.")
        flags = {k: spec.get(k, False) for k in ("select_out", "select_in", "scatter_out", "gather_in")}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise RankwiseError(f"{where}: select_out/select_in/scatter_out/gather_in must be true or false, got "
                                f"{flags}; the layer map is corrupt.")
        try:
            n, m = int(spec["in_features"]), int(spec["out_features"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RankwiseError(f"{where}: the quantised MoDeGPT spec lacks {exc}; write the checkpoint again.") \
                from None
        q = QuantLinear.from_spec(inner, dtype, device)
        if q.out_features > m or q.in_features > n or (not flags["select_out"] and q.out_features != m) or (
                not flags["select_in"] and q.in_features != n):
            raise RankwiseError(f"{where}: inner block {q.out_features}×{q.in_features} does not fit the "
                                f"{m}×{n} layer; the layer map is corrupt.")
        return cls(q, n, m, **flags)

    def spec(self) -> dict[str, Any]:
        if not isinstance(self.inner, QuantLinear):
            raise RankwiseError("QuantSelect.spec: the inner block is not quantised yet.")
        return {"type": self.layer_type, "in_features": self.in_features, "out_features": self.out_features,
                "rows": self.rows, "cols": self.cols, "select_out": self.out_index is not None,
                "select_in": self.in_index is not None, "scatter_out": self.scatter_out,
                "gather_in": self.gather_in, "inner": self.inner.spec()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather_in and self.in_index is not None:
            x = x.index_select(-1, self.in_index)
        y = self.inner(x)
        if self.scatter_out and self.out_index is not None:
            out = y.new_zeros(*y.shape[:-1], self.out_features)
            return out.index_copy_(-1, self.out_index, y)
        return y

    @torch.no_grad()
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The out_features × in_features matrix (Ŵ + B A in the kept block, zeros elsewhere)."""
        inner = self.inner
        block = inner.dense_weight(torch.float32) if isinstance(inner, QuantLinear) else inner.weight.float()
        W = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=block.device)
        rows = self.out_index if self.out_index is not None else torch.arange(self.out_features, device=W.device)
        cols = self.in_index if self.in_index is not None else torch.arange(self.in_features, device=W.device)
        W[rows[:, None], cols[None, :]] = block
        return W.to(dtype or self._float_dtype())

    def _float_dtype(self) -> torch.dtype:
        """The dtype of the layer's floating tensors (the model's dtype)."""
        inner = self.inner
        if isinstance(inner, QuantLinear):
            return next((t.dtype for t in (inner.eora_A, inner.bias) if t is not None), inner._dtype)
        return inner.weight.dtype

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """``nn.Linear(in_features, out_features)`` (exact when every MoDeGPT layer is densified at once)."""
        bias = self.inner.bias
        w = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if bias is not None:
            b = torch.zeros(self.out_features, dtype=w.dtype, device=w.device)
            b[self.out_index if self.out_index is not None else slice(None)] = bias.to(w.dtype)
            lin.bias.copy_(b)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}, "
                f"cols={self.cols}, scatter_out={self.scatter_out}, gather_in={self.gather_in}")


def _register() -> None:
    """Register the layer types with the checkpoint layer-type registry (when the tree has it)."""
    try:
        from rankwise.surgery.layers import LAYER_TYPES
    except ImportError:  # pragma: no cover - older tree without the registry: rankwise.quantization.io loads them
        return
    for cls in (QuantLinear, QuantLowRank, QuantSelect):
        if cls.layer_type not in LAYER_TYPES.names():
            LAYER_TYPES.register(cls.layer_type, cls)


_register()
