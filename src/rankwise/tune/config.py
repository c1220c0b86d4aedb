"""``AdapterConfig``: what to attach, where, at which rank (docs/methods.md §4).

One dataclass serves every adapter; each method reads the fields it needs and
ignores the rest (documented per field). It is stored verbatim in
``rankwise_adapter.json`` so :func:`rankwise.tune.load_adapter` can rebuild the
same adapter on the same base model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rankwise.errors import RankwiseError

DEFAULT_RANK = 8


@dataclass
class AdapterConfig:
    """Configuration of a spectral adapter.

    Attributes:
        method: one of :data:`rankwise.tune.METHODS` (``lora``, ``pissa``, ``svfit``, ``salt``, ``sorsa``,
            ``loldu``, ``welore-lrc``, ``heal``).
        rank: adapter rank r (default 8). For ``svfit`` ``None`` means "energy rank at ``energy``" per matrix.
            Must satisfy 0 < r < min(m, n) for every targeted matrix.
        alpha: LoRA-style scale numerator, ΔW = (alpha / r)·B A (default 2·r, PEFT's common choice).
        targets: regex searched in module names (``None``: every linear layer except the LM head / tied layers
            and the ``modules_to_save``).
        exclude: regex of module names to leave alone.
        modules_to_save: regex of extra modules trained in full and saved with the adapter (the fresh
            classification head: ``classifier|score``).
        dropout: dropout on the adapter input (lora, pissa, salt's LoRA part, heal's LoRA).
        svd: ``exact`` (default, LAPACK) or ``randomized`` (``torch.svd_lowrank``) for the initial SVDs.
        svd_iters: power iterations of the randomized SVD.
        energy: energy fraction that fixes svfit's rank when ``rank`` is None (docs/methods.md §4: 0.99).
        lora_rank: rank of SALT's LoRA on the residual subspace and of heal's LoRA (default: ``rank``).
        gamma: weight of SORSA's orthogonality regulariser γ(‖UᵀU − I‖² + ‖VᵀV − I‖²).
        heal_mode: ``factors`` (train the A/B factors of LowRankLinear layers) or ``lora`` (a LoRA beside them).
        seed: seed of random initialisations (LoRA's Kaiming A, randomized SVD sketches).
    """

    method: str = "lora"
    rank: int | None = None
    alpha: float | None = None
    targets: str | None = None
    exclude: str | None = None
    modules_to_save: str | None = None
    dropout: float = 0.0
    svd: str = "exact"
    svd_iters: int = 2
    energy: float = 0.99
    lora_rank: int | None = None
    gamma: float = 4e-4
    heal_mode: str = "factors"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def r(self) -> int:
        """The rank actually used when ``rank`` is None (8)."""
        return DEFAULT_RANK if self.rank is None else int(self.rank)

    @property
    def lora_alpha(self) -> float:
        """alpha, defaulting to 2·r."""
        return float(2 * self.r if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        """alpha / r: the factor in front of B A."""
        return self.lora_alpha / self.r

    def validate(self) -> AdapterConfig:
        """Check the method-independent fields; raise a one-line :class:`RankwiseError`."""
        from rankwise.tune.registry import canonical_method

        self.method = canonical_method(self.method)
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
                raise RankwiseError(f"rank must be a positive integer, got {self.rank!r}; e.g. --rank 8.")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank <= 0):
            raise RankwiseError(f"lora_rank must be a positive integer, got {self.lora_rank!r}.")
        if self.alpha is not None and not float(self.alpha) > 0:
            raise RankwiseError(f"alpha must be positive, got {self.alpha!r}; e.g. --alpha 16.")
        if self.svd not in ("exact", "randomized"):
            raise RankwiseError(f"svd must be 'exact' or 'randomized', got {self.svd!r}.")
        if self.svd_iters < 0:
            raise RankwiseError(f"svd_iters must be >= 0, got {self.svd_iters}.")
        if not 0.0 < self.energy <= 1.0:
            raise RankwiseError(f"energy must lie in (0, 1], got {self.energy}; e.g. 0.99.")
        if not 0.0 <= self.dropout < 1.0:
            raise RankwiseError(f"dropout must lie in [0, 1), got {self.dropout}.")
        if self.gamma < 0:
            raise RankwiseError(f"gamma must be >= 0, got {self.gamma}.")
        if self.heal_mode not in ("factors", "lora"):
            raise RankwiseError(f"heal_mode must be 'factors' or 'lora', got {self.heal_mode!r}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Rebuild from :meth:`to_dict` output, ignoring unknown keys (forward compatibility)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
