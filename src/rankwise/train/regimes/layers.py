"""The layers the training regimes put in place of dense ``nn.Linear`` / ``Conv1D`` matrices.

* :class:`SparseLowRankLinear` (layer type ``"sparse_lowrank"``): y = s·B(A x) + S x + b with a sparse S
  on a *fixed* support. ``pattern="random"`` (SLTrain): the support is ``nnz`` random entries of the
  m×n matrix, stored as flat indices (``sparse_index``, int32 when m·n < 2³¹) with their values
  (``sparse_value``, trainable). ``pattern="channel"`` (LOST): the support is ``nnz`` whole input
  channels (columns), ``sparse_index`` their column numbers and ``sparse_value`` the m×nnz block.
* :class:`ReLoRALinear` (layer type ``"relora"``): y = W x + b + s·B(A x) with W frozen and B, A trainable;
  :meth:`ReLoRALinear.merge` folds s·B A into W and restarts the factors (ReLoRA's merge-and-reinit).

Both keep the low-rank factors as two ``nn.Linear`` children ``A`` (in → r) and ``B`` (r → out), like
:class:`~rankwise.surgery.lowrank.LowRankLinear`, and follow the layer-type protocol of
:mod:`rankwise.surgery.layers` (``spec()`` / ``from_spec()``), so ``rankwise.save`` writes them into a
rankwise/2 checkpoint that ``rankwise.load`` (``from_pretrained`` with ``import rankwise``) rebuilds;
``to_dense()`` gives the equivalent plain layer for ``--export-dense``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.lowrank import FactorSizes
from rankwise.surgery.targets import Conv1D

PATTERNS = ("random", "channel")
_KINDS = ("linear", "conv1d")
__all__ = ["PATTERNS", "ReLoRALinear", "SparseLowRankLinear", "index_dtype"]


def index_dtype(numel: int) -> torch.dtype:
    """int32 when every flat index of a ``numel``-entry matrix fits (half the bytes of int64), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def _spec_int(spec: dict[str, Any], key: str, where: str, minimum: int = 1) -> int:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RankwiseError(f"{where}: {key} must be an integer >= {minimum}, got {v!r}; the layer map is corrupt.")
    return v


def _spec_common(spec: Any, where_kind: str) -> tuple[str, int, int, int, bool, str, float]:
    if not isinstance(spec, dict):
        raise RankwiseError(f"a {where_kind} layer spec must be a mapping, got {type(spec).__name__}; "
                            "the layer map is corrupt.")
    where = f"layer spec {spec.get('name', '')!s}".rstrip()
    r = _spec_int(spec, "rank", where)
    n = _spec_int(spec, "in_features", where)
    m = _spec_int(spec, "out_features", where)
    bias = spec.get("bias", False)
    if not isinstance(bias, bool):
        raise RankwiseError(f"{where}: bias must be true or false, got {bias!r}; the layer map is corrupt.")
    kind = spec.get("kind", "linear")
    if kind not in _KINDS:
        raise RankwiseError(f"{where}: kind must be one of {', '.join(_KINDS)}, got {kind!r}.")
    scale = spec.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise RankwiseError(f"{where}: scale must be a finite number, got {scale!r}; the layer map is corrupt.")
    return where, r, n, m, bias, kind, float(scale)


def _dense_module(w: torch.Tensor, bias: torch.Tensor | None, kind: str) -> nn.Module:
    """An ``nn.Linear`` (or GPT-2 ``Conv1D`` for ``kind="conv1d"``) holding the m×n weight ``w``."""
    m, n = w.shape
    if kind == "conv1d" and Conv1D:
        layer = Conv1D(m, n).to(device=w.device, dtype=w.dtype)
        layer.weight.data.copy_(w.T)
        layer.bias.data.copy_(bias) if bias is not None else layer.bias.data.zero_()
        return layer
    layer = nn.Linear(n, m, bias=bias is not None, device=w.device, dtype=w.dtype)
    layer.weight.data.copy_(w)
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


class _FixedSupportLinear(torch.autograd.Function):
    """x ↦ x Sᵀ for S (m×n) zero except ``values`` at the flat positions ``index``.

    Written by hand because neither torch.sparse nor any peer package trains the values of a fixed
    random support without keeping a dense m×n copy alive for backward (SLTrain ships a CUDA
    extension for this): here S is scattered into a temporary dense matrix in forward and again in
    backward, and only x, the values and the index are saved, so between forward and backward a layer
    holds nnz numbers, not m·n.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, m: int, n: int) -> torch.Tensor:
        ctx.save_for_backward(x, values, index)
        ctx.shape = (m, n)
        s = values.new_zeros(m * n).index_put_((index.long(),), values).view(m, n)
        return x @ s.T.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205 - autograd signature
        x, values, index = ctx.saved_tensors
        m, n = ctx.shape
        gx = gv = None
        if ctx.needs_input_grad[0]:
            s = values.new_zeros(m * n).index_put_((index.long(),), values).view(m, n)
            gx = grad @ s.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, m)
            x2 = x.reshape(-1, n)
            gv = (g2.T @ x2).reshape(-1)[index.long()].to(values.dtype)  # the dense gradient, sampled on the support
        return gx, gv, None, None, None


class SparseLowRankLinear(FactorSizes, nn.Module):
    """y = scale·B(A x) + S x + b: a low-rank product plus a sparse matrix on a fixed support.

    ``A = nn.Linear(in, rank, bias=False)``, ``B = nn.Linear(rank, out, bias=bias)`` (the bias lives in
    ``B.bias``), ``sparse_index`` (buffer, saved) and ``sparse_value`` (trainable). Parameters:
    rank·(in + out) + (nnz for ``"random"``, out·nnz for ``"channel"``) + out if biased.
    """

    #: name of this layer type in :data:`rankwise.surgery.layers.LAYER_TYPES`
    layer_type = "sparse_lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, nnz: int, pattern: str = "random",
                 scale: float = 1.0, bias: bool = True, orig_kind: str = "linear",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if pattern not in PATTERNS:
            raise RankwiseError(f"sparse pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}.")
        limit = in_features * out_features if pattern == "random" else in_features
        if not 1 <= nnz <= limit:
            raise RankwiseError(f"a {pattern} sparse support of a {out_features}x{in_features} matrix holds 1 to "
                                f"{limit} {'entries' if pattern == 'random' else 'columns'}, got {nnz}.")
        if rank < 1:
            raise RankwiseError(f"rank must be >= 1, got {rank}.")
        self.pattern, self.scale, self.orig_kind = pattern, float(scale), orig_kind
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Linear(in_features, rank, bias=False, **kw)
        self.B = nn.Linear(rank, out_features, bias=bias, **kw)
        idx_dtype = index_dtype(in_features * out_features) if pattern == "random" else torch.int64
        self.register_buffer("sparse_index", torch.zeros(nnz, dtype=idx_dtype, device=device))
        shape = (nnz,) if pattern == "random" else (out_features, nnz)
        self.sparse_value = nn.Parameter(torch.zeros(shape, **kw))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # rankwise/2 checkpoints hold an empty placeholder under the dense name ``<name>.weight`` (so plain
        # transformers refuses them); it carries nothing for this layer
        placeholder = state_dict.get(prefix + "weight")
        if isinstance(placeholder, torch.Tensor) and placeholder.numel() == 0:
            state_dict.pop(prefix + "weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def nnz(self) -> int:
        """Size of the support: entries (``"random"``) or columns (``"channel"``)."""
        return int(self.sparse_index.numel())

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    @property
    def num_params(self) -> int:
        """Trainable numbers of the layer, bias included: rank·(in+out) + sparse values + out."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.B(self.A(x) * self.scale) if self.scale != 1.0 else self.B(self.A(x))
        if self.pattern == "channel":
            return low + x.index_select(-1, self.sparse_index) @ self.sparse_value.T.to(x.dtype)
        return low + _FixedSupportLinear.apply(x, self.sparse_value, self.sparse_index, self.out_features,
                                               self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"pattern={self.pattern}, nnz={self.nnz}, scale={self.scale:g}, bias={self.bias is not None}")

    @torch.no_grad()
    def sparse_dense(self) -> torch.Tensor:
        """S as a dense m×n tensor."""
        m, n = self.out_features, self.in_features
        v = self.sparse_value
        if self.pattern == "channel":
            s = v.new_zeros(m, n)
            s[:, self.sparse_index.long()] = v
            return s
        return v.new_zeros(m * n).index_put_((self.sparse_index.long(),), v).view(m, n)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """scale·B A + S as an m×n tensor (accumulated in float32 at least)."""
        a, b = self.A.weight, self.B.weight
        dt = torch.promote_types(a.dtype, torch.float32)
        return (self.scale * (b.to(dt) @ a.to(dt)) + self.sparse_dense().to(dt)).to(a.dtype)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The plain layer (``nn.Linear``, or ``Conv1D`` if that was replaced) computing the same map."""
        return _dense_module(self.dense_weight(), self.bias, self.orig_kind)

    def spec(self) -> dict[str, Any]:
        """What :meth:`from_spec` needs to rebuild this layer empty (recorded in the checkpoint's layer map)."""
        return {"type": self.layer_type, "rank": self.rank, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None, "kind": self.orig_kind,
                "pattern": self.pattern, "nnz": self.nnz, "scale": self.scale}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> SparseLowRankLinear:
        """An uninitialised layer of the shape ``spec`` describes (``device="meta"`` allowed)."""
        where, r, n, m, bias, kind, scale = _spec_common(spec, "sparse_lowrank")
        pattern = spec.get("pattern")
        if pattern not in PATTERNS:
            raise RankwiseError(f"{where}: pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}; "
                                "the layer map is corrupt.")
        nnz = _spec_int(spec, "nnz", where)
        return cls(n, m, r, nnz, pattern=pattern, scale=scale, bias=bias, orig_kind=kind, device=device, dtype=dtype)


class ReLoRALinear(nn.Module):
    """y = W x + b + scale·B(A x): a frozen dense weight plus a trainable LoRA, merged every K steps.

    ``weight`` (m×n, frozen) and ``bias`` keep the dense layer's names, so the state-dict keys of the
    dense part are unchanged; the factors are ``A.weight`` (r×n) and ``B.weight`` (m×r).
    """

    layer_type = "relora"

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float = 1.0, bias: bool = True,
                 orig_kind: str = "linear", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise RankwiseError(f"rank must be >= 1, got {rank}.")
        kw = {"device": device, "dtype": dtype}
        self.scale, self.orig_kind = float(scale), orig_kind
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.A = nn.Linear(in_features, rank, bias=False, **kw)
        self.B = nn.Linear(rank, out_features, bias=False, **kw)
        self.merges = 0
        if self.weight.device.type != "meta":
            self.reset_factors()

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def rank(self) -> int:
        return int(self.A.out_features)

    @torch.no_grad()
    def reset_factors(self, generator: torch.Generator | None = None) -> None:
        """LoRA's init: A Kaiming-uniform (as ``nn.Linear``), B = 0, so the layer computes W x + b."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) of an r×n weight
        a = self.A.weight
        a.copy_(torch.rand(a.shape, generator=generator, dtype=torch.float32, device=a.device)
                .mul_(2 * bound).sub_(bound).to(a.dtype))
        self.B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.B(self.A(x)) * self.scale

    @torch.no_grad()
    def merge(self, generator: torch.Generator | None = None) -> None:
        """W ← W + scale·B A (in float32 at least), then restart A, B (the layer's function is unchanged)."""
        w = self.weight
        dt = torch.promote_types(w.dtype, torch.float32)
        w.copy_((w.to(dt) + self.scale * (self.B.weight.to(dt) @ self.A.weight.to(dt))).to(w.dtype))
        self.reset_factors(generator)
        self.merges += 1

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        w = self.weight
        dt = torch.promote_types(w.dtype, torch.float32)
        return (w.to(dt) + self.scale * (self.B.weight.to(dt) @ self.A.weight.to(dt))).to(w.dtype)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        return _dense_module(self.dense_weight(), self.bias, self.orig_kind)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, bias={self.bias is not None}")

    def spec(self) -> dict[str, Any]:
        return {"type": self.layer_type, "rank": self.rank, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None, "kind": self.orig_kind,
                "scale": self.scale}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> ReLoRALinear:
        _, r, n, m, bias, kind, scale = _spec_common(spec, "relora")
        return cls(n, m, r, scale=scale, bias=bias, orig_kind=kind, device=device, dtype=dtype)


def _register() -> None:
    from rankwise.surgery.layers import LAYER_TYPES

    for cls in (SparseLowRankLinear, ReLoRALinear):
        if cls.layer_type not in LAYER_TYPES.names():
            LAYER_TYPES.register(cls.layer_type, cls)


_register()
