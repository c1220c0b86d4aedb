"""``LowRankLinear``: y = B (A x) + b, the factorised replacement of a dense layer.

The layer is made of two standard ``nn.Linear`` children, ``A`` (in → k, no bias)
and ``B`` (k → out, carrying the bias), so libraries that find or swap linear
layers by type (PEFT's ``target_modules="all-linear"``, torchao, bitsandbytes)
see and wrap the factors. State-dict keys are ``<name>.A.weight`` (k×n),
``<name>.B.weight`` (m×k) and ``<name>.B.bias``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.engine.svd import truncated_svd
from rankwise.errors import RankwiseError
from rankwise.surgery.targets import Conv1D, Target

LAYER_KINDS = ("linear", "conv1d")


def _positive_int(spec: dict[str, Any], key: str, where: str) -> int:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RankwiseError(f"{where}: {key} must be a positive integer, got {v!r}; the rank map is corrupt.")
    return v


class FactorSizes:
    """Sizes of a layer holding ``A = nn.Linear(in, k)`` and ``B = nn.Linear(k, out)`` children.

    Read from the children, so they stay right if another library (PEFT) swaps them; shared by every
    layer type built on an A/B pair (LowRankLinear, the SLTrain/LOST sparse-plus-low-rank layer).
    """

    A: nn.Linear
    B: nn.Linear

    @property
    def in_features(self) -> int:
        return int(self.A.in_features)

    @property
    def out_features(self) -> int:
        return int(self.B.out_features)

    @property
    def rank(self) -> int:
        return int(self.A.out_features)


class LowRankLinear(FactorSizes, nn.Module):
    """A rank-k linear map W ≈ B A with B (out×k) and A (k×in), plus an optional bias.

    ``A = nn.Linear(in, k, bias=False)`` and ``B = nn.Linear(k, out, bias=bias)``;
    the bias lives in ``B.bias`` (also readable as ``layer.bias``). ``orig_kind``
    remembers whether the layer it replaced was an ``nn.Linear`` or a GPT-2
    ``Conv1D`` so :meth:`to_dense` can give back the same kind of module.
    """

    #: name of this layer type in :data:`rankwise.surgery.layers.LAYER_TYPES`
    layer_type = "lowrank"

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
        self.orig_kind = orig_kind
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Linear(in_features, rank, bias=False, **kw)
        self.B = nn.Linear(rank, out_features, bias=bias, **kw)
        if self.B.weight.device.type != "meta":
            with torch.no_grad():  # B = 0: a fresh layer is the zero map (A keeps nn.Linear's Kaiming init)
                self.B.weight.zero_()
                if self.B.bias is not None:
                    self.B.bias.zero_()

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias (stored in ``B.bias``), or None."""
        return self.B.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # checkpoints of the rankwise/2 format hold an empty placeholder under the dense name ``<name>.weight``
        # (so plain transformers refuses them); it carries nothing for this layer
        placeholder = state_dict.get(prefix + "weight")
        if isinstance(placeholder, torch.Tensor) and placeholder.numel() == 0:
            state_dict.pop(prefix + "weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )

    @property
    def num_params(self) -> int:
        """Numbers stored by the factors (bias excluded): rank·(in + out)."""
        return self.rank * (self.in_features + self.out_features)

    # -- layer-type protocol (rankwise.surgery.layers.LAYER_TYPES) ---------------------------------------------
    def spec(self) -> dict[str, Any]:
        """What :meth:`from_spec` needs to rebuild this layer empty (recorded in the checkpoint's layer map)."""
        return {
            "type": self.layer_type,
            "rank": self.rank,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "kind": self.orig_kind,
        }

    @classmethod
    def from_spec(
        cls, spec: dict[str, Any], dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> LowRankLinear:
        """An uninitialised layer of the shape ``spec`` describes (on ``device``, ``"meta"`` allowed)."""
        where = f"layer spec {spec.get('name', '')!s}".rstrip()
        if not isinstance(spec, dict):
            raise RankwiseError(f"a layer spec must be a mapping, got {type(spec).__name__}; the rank map is corrupt.")
        k = _positive_int(spec, "rank", where)
        n = _positive_int(spec, "in_features", where)
        m = _positive_int(spec, "out_features", where)
        kind = spec.get("kind", "linear")
        if kind not in LAYER_KINDS:
            raise RankwiseError(f"{where}: kind must be one of {', '.join(LAYER_KINDS)}, got {kind!r}.")
        bias = spec.get("bias", False)
        if not isinstance(bias, bool):
            raise RankwiseError(f"{where}: bias must be true or false, got {bias!r}; the rank map is corrupt.")
        return cls(n, m, k, bias=bias, orig_kind=kind, device=device, dtype=dtype)

    # -- constructors ---------------------------------------------------------------------------------------------
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
        with torch.device("meta"):  # no init work: every value is overwritten below
            layer = cls(n, m, k, bias=bias is not None, orig_kind=orig_kind, dtype=dtype)
        # row-major copies (an SVD factor such as Vᵀ is often a transposed view): the layer then computes exactly
        # what it computes after a save/load round trip, where every tensor is read back contiguous
        fmt = torch.contiguous_format
        layer.A.weight = nn.Parameter(A.detach().to(dtype).clone(memory_format=fmt), requires_grad=True)
        layer.B.weight = nn.Parameter(B.detach().to(device=A.device, dtype=dtype).clone(memory_format=fmt),
                                      requires_grad=True)
        if bias is not None:
            layer.B.bias = nn.Parameter(bias.detach().to(device=A.device, dtype=dtype).clone(memory_format=fmt),
                                        requires_grad=True)
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
        a, b = self.A.weight, self.B.weight
        dt = torch.promote_types(a.dtype, torch.float32)
        return (b.to(dt) @ a.to(dt)).to(a.dtype)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``, if that is what was replaced) holding B A."""
        w = self.dense_weight()
        bias = self.bias
        if self.orig_kind == "conv1d" and Conv1D:
            layer = Conv1D(self.out_features, self.in_features)
            layer = layer.to(device=w.device, dtype=w.dtype)
            layer.weight.copy_(w.T)
            if bias is not None:
                layer.bias.copy_(bias)
            else:
                layer.bias.zero_()
            return layer
        layer = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

