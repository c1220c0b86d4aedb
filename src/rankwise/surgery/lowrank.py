"""``LowRankLinear``: y = B (A x) + b, the factorised replacement of a dense layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.engine.svd import truncated_svd
from rankwise.surgery.targets import Conv1D, Target


class LowRankLinear(nn.Module):
    """A rank-k linear map W ≈ B A with B (out×k) and A (k×in), plus an optional bias.

    Parameters are named ``A``, ``B`` and ``bias`` so a state dict stores them
    under the original module name (``...q_proj.A``). ``orig_kind`` remembers
    whether the layer it replaced was an ``nn.Linear`` or a GPT-2 ``Conv1D`` so
    :meth:`to_dense` can give back the same kind of module.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        orig_kind: str = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.orig_kind = orig_kind
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.A, a=5**0.5)
        nn.init.zeros_(self.B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )

    @property
    def num_params(self) -> int:
        """Numbers stored by the factors (bias excluded): rank·(in + out)."""
        return self.rank * (self.in_features + self.out_features)

    @classmethod
    def from_factors(
        cls,
        B: torch.Tensor,
        A: torch.Tensor,
        bias: torch.Tensor | None = None,
        orig_kind: str = "linear",
        dtype: torch.dtype | None = None,
    ) -> LowRankLinear:
        """Wrap given factors (B: m×k, A: k×n) into a layer, cast to ``dtype`` (default: A's)."""
        m, k = B.shape
        k2, n = A.shape
        if k != k2:
            raise ValueError(f"factor shapes do not chain: B {tuple(B.shape)} and A {tuple(A.shape)}")
        dtype = dtype or A.dtype
        layer = cls(n, m, k, bias=bias is not None, orig_kind=orig_kind, device=A.device, dtype=dtype)
        with torch.no_grad():
            layer.A.copy_(A.to(dtype))
            layer.B.copy_(B.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.detach().to(dtype))
        return layer

    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        rank: int,
        svd: str = "exact",
        niter: int = 2,
        oversample: int = 10,
    ) -> LowRankLinear:
        """Best rank-``rank`` approximation (Eckart–Young) of an ``nn.Linear`` or ``Conv1D``.

        The singular values are split evenly, B = U√Σ and A = √Σ Vᵀ, so both
        factors have the same scale (better conditioned for later fine-tuning).
        At full rank the layer reproduces the original output up to float error.
        """
        t = Target(name="", module=module)
        w = t.weight()
        u, s, v = truncated_svd(w, rank, method=svd, niter=niter, oversample=oversample)
        root = s.sqrt()
        return cls.from_factors(
            u * root, root[:, None] * v.T, t.bias, orig_kind="conv1d" if t.transposed else "linear",
            dtype=w.dtype,
        )

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """B A as an m×n tensor (computed in float32 at least)."""
        dt = torch.promote_types(self.A.dtype, torch.float32)
        return (self.B.to(dt) @ self.A.to(dt)).to(self.A.dtype)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``, if that is what was replaced) holding B A."""
        w = self.dense_weight()
        has_bias = self.bias is not None
        if self.orig_kind == "conv1d" and Conv1D:
            layer = Conv1D(self.out_features, self.in_features)
            layer = layer.to(device=w.device, dtype=w.dtype)
            layer.weight.copy_(w.T)
            if has_bias:
                layer.bias.copy_(self.bias)
            else:
                layer.bias.zero_()
            return layer
        layer = nn.Linear(self.in_features, self.out_features, bias=has_bias, device=w.device, dtype=w.dtype)
        layer.weight.copy_(w)
        if has_bias:
            layer.bias.copy_(self.bias)
        return layer
