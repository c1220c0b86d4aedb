"""``AdapterConfig``: what to attach, where, at which rank (docs/methods.md §4).

One dataclass serves every adapter; each method reads the fields it needs and
ignores the rest (documented per field). It validates itself in
``__post_init__`` (one-line :class:`RankwiseError`), feeds the ``rankwise tune``
options through :func:`rankwise.config.add_config_arguments`, and is stored
verbatim in ``rankwise_adapter.json`` so :func:`rankwise.tune.load_adapter`
can rebuild the same adapter on the same base model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rankwise.config import check_numbers
from rankwise.engine import SVD_METHODS
from rankwise.errors import RankwiseError

DEFAULT_RANK = 8


def _method_names() -> tuple[str, ...]:
    from rankwise.tune.registry import ADAPTERS

    return ADAPTERS.names()


@dataclass
class AdapterConfig:
    """Configuration of an adapter.

    Attributes:
        method: one of :data:`rankwise.tune.METHODS`: native ``lora``, ``pissa``, ``svfit``, ``salt``,
            ``sorsa``, ``loldu``, ``lora-xs``, ``lora-ga``, ``dylora``, ``welore-lrc``, ``heal``; through PEFT
            ``dora``, ``adalora``, ``eva``, ``olora``, ``corda``, ``loftq``.
        rank: adapter rank r (default 8). For ``svfit`` ``None`` means "energy rank at ``energy``" per matrix.
            Must satisfy 0 < r < min(m, n) for every targeted matrix. AdaLoRA's initial rank.
        alpha: LoRA-style scale numerator, ΔW = (alpha / r)·B A (default 2·r, PEFT's common choice; loftq: r,
            since PEFT's LoftQ factors carry no 1/scale, so only alpha = r makes Q + (alpha/r)·B A ≈ W).
        targets: regex searched in module names (``None``: every linear layer except the LM head / tied layers
            and the ``modules_to_save``).
        exclude: regex of module names to leave alone.
        modules_to_save: regex of extra modules trained in full and saved with the adapter (the fresh
            classification head: ``classifier|score``).
        dropout: dropout on the adapter input.
        svd: ``exact`` (default, LAPACK) or ``randomized`` (``torch.svd_lowrank``) for the initial SVDs.
        svd_iters: power iterations of the randomized SVD.
        energy: energy fraction that fixes svfit's rank when ``rank`` is None (docs/methods.md §4: 0.99).
        lora_rank: rank of SALT's LoRA on the residual subspace and of heal's LoRA (default: ``rank``).
        gamma: weight of SORSA's orthogonality regulariser γ(‖UᵀU − I‖² + ‖VᵀV − I‖²).
        heal_mode: ``factors`` (train the A/B factors of LowRankLinear layers) or ``lora`` (a LoRA beside them).
        eval_rank: dylora: the rank used at inference (≤ rank; default: rank).
        target_rank: adalora: the average rank budget it prunes to (default rank // 2).
        init_batches: lora-ga / eva / corda: training batches used for the data-driven init (default 8).
        ga_gamma: lora-ga: γ of the paper's stable scale, factors × m^¼/√γ (default 16).
        loftq_iter: loftq: alternating NF4-quantisation / rank-r SVD iterations (PEFT's ``loftq_iter``, default 1).
        total_steps: adalora: the training length its rank schedule needs (set by the trainer).
        seed: seed of random initialisations (LoRA's Kaiming A, randomized SVD sketches, DyLoRA's rank draws).
    """

    method: str = field(default="lora", metadata={"help": "adapter method", "choices": _method_names})
    rank: int | None = field(default=None, metadata={"help": "adapter rank (default 8; svfit: energy rank)"})
    alpha: float | None = field(default=None, metadata={"help": "scale numerator, ΔW = (alpha/rank)·BA "
                                                                 "(default 2·rank; loftq: rank)"})
    targets: str | None = field(default=None, metadata={"help": "regex of module names to adapt "
                                                                "(default: all linear layers)"})
    exclude: str | None = field(default=None, metadata={"help": "regex of module names to leave alone"})
    modules_to_save: str | None = field(default=None, metadata={"cli": False})
    dropout: float = field(default=0.0, metadata={"help": "adapter dropout"})
    svd: str = field(default="exact", metadata={"help": "initial SVDs", "choices": SVD_METHODS})
    svd_iters: int = field(default=2, metadata={"help": "power iterations of the randomized SVD"})
    energy: float = field(default=0.99, metadata={"help": "svfit: energy fraction that sets the rank"})
    lora_rank: int | None = field(default=None, metadata={"help": "salt / heal --heal-mode lora: rank of the "
                                                                   "LoRA part (default --rank)"})
    gamma: float = field(default=4e-4, metadata={"help": "sorsa: orthogonality regulariser weight"})
    heal_mode: str = field(default="factors", metadata={"help": "heal: train the factors or a LoRA beside them",
                                                        "choices": ("factors", "lora")})
    eval_rank: int | None = field(default=None, metadata={"help": "dylora: rank used at inference "
                                                                   "(<= --rank; default --rank)"})
    target_rank: int | None = field(default=None, metadata={"help": "adalora: average rank budget after "
                                                                     "pruning (default rank // 2)"})
    init_batches: int = field(default=8, metadata={"help": "lora-ga / eva / corda: training batches for the "
                                                           "data-driven init"})
    ga_gamma: float = field(default=16.0, metadata={"help": "lora-ga: gamma of the stable scale m^(1/4)/sqrt(gamma)"})
    loftq_iter: int = field(default=1, metadata={"help": "loftq: alternating NF4-quantise / SVD iterations"})
    total_steps: int | None = field(default=None, metadata={"cli": False})
    seed: int = field(default=0, metadata={"cli": False})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self) -> None:
        check_numbers(self)  # the API bypasses the CLI's parsing: finite floats, whole 64-bit ints
        self.validate()

    @property
    def r(self) -> int:
        """The rank actually used when ``rank`` is None (8)."""
        return DEFAULT_RANK if self.rank is None else int(self.rank)

    @property
    def lora_alpha(self) -> float:
        """alpha, defaulting to 2·r (loftq: r).

        PEFT's LoftQ init sets B A to the rank-r part of W − Q without dividing by the scale α/r (PEFT issue
        #1982), so with α = 2r the start would be Q + 2·(W − Q)_r, no closer to W than Q itself; α = r keeps
        LoftQ's Q + B A ≈ W."""
        if self.alpha is None:
            return float(self.r if self.method == "loftq" else 2 * self.r)
        return float(self.alpha)

    @property
    def scaling(self) -> float:
        """alpha / r: the factor in front of B A."""
        return self.lora_alpha / self.r

    @staticmethod
    def _positive(name: str, value: Any, flag: str) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise RankwiseError(f"{name} must be a positive integer, got {value!r}; e.g. {flag} 8.")

    def validate(self) -> AdapterConfig:
        """Check the method-independent fields; raise a one-line :class:`RankwiseError` (also run on init)."""
        from rankwise.tune.registry import canonical_method

        self.method = canonical_method(self.method)
        self._positive("rank", self.rank, "--rank")
        self._positive("lora_rank", self.lora_rank, "--lora-rank")
        self._positive("eval_rank", self.eval_rank, "--eval-rank")
        self._positive("target_rank", self.target_rank, "--target-rank")
        self._positive("init_batches", self.init_batches, "--init-batches")
        self._positive("total_steps", self.total_steps, "--steps")
        self._positive("loftq_iter", self.loftq_iter, "--loftq-iter")
        if self.eval_rank is not None and self.eval_rank > self.r:
            raise RankwiseError(f"--eval-rank {self.eval_rank} is above the trained rank {self.r}; DyLoRA serves "
                                f"every rank from 1 to {self.r}.")
        if self.eval_rank is not None and self.method != "dylora":
            raise RankwiseError(f"--eval-rank applies to dylora only (method is {self.method}).")
        if self.alpha is not None and not float(self.alpha) > 0:
            raise RankwiseError(f"alpha must be positive, got {self.alpha!r}; e.g. --alpha 16.")
        if self.svd not in SVD_METHODS:
            raise RankwiseError(f"svd must be one of {', '.join(SVD_METHODS)}, got {self.svd!r}.")
        if self.svd_iters < 0:
            raise RankwiseError(f"svd_iters must be >= 0, got {self.svd_iters}.")
        if not 0.0 < self.energy <= 1.0:
            raise RankwiseError(f"energy must lie in (0, 1], got {self.energy}; e.g. 0.99.")
        if not 0.0 <= self.dropout < 1.0:
            raise RankwiseError(f"dropout must lie in [0, 1), got {self.dropout}.")
        if self.gamma < 0:
            raise RankwiseError(f"gamma must be >= 0, got {self.gamma}.")
        if not self.ga_gamma > 0:
            raise RankwiseError(f"ga_gamma must be positive, got {self.ga_gamma}.")
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
