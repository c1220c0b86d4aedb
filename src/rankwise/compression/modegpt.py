"""MoDeGPT (Lin et al., ICLR 2025): training-free modular decomposition of each decoder block.

Three module pairs of every block are compressed jointly from calibration statistics
(float64), each with the decomposition the paper gives it (docs/methods.md, "MoDeGPT"):

* **MLP** (gate/up → act → down), *Nyström*: keep the k intermediate neurons with the largest
  ridge leverage scores of C_σ (the correlation of down_proj's input, i.e. after the
  nonlinearity); gate/up keep those rows, down_proj becomes W_d C_σ[:,S] (C_σ[S,S] + δI)⁻¹,
  the least-squares fit of the dense output from the kept neurons.
* **Key–query**, *CR decomposition*: per key/value group, keep the head dimensions with the
  largest ‖C_q^{1/2}[:,i]‖·‖C_k^{1/2}[:,i]‖ (summed over the group's query heads); RoPE rotates
  the pairs (i, i+r/2), so a pair is kept or dropped whole (its score uses the pair's norms,
  which the rotation leaves unchanged). q_proj/k_proj keep those rows and scatter them back to
  their positions (:class:`~rankwise.surgery.select.SelectLinear`): head_dim is unchanged, so
  the HF attention code (RoPE, scaling, GQA repeat) runs as before; dropped pairs give q·k zero.
* **Value–output**, *SVD*: per key/value group, the stacked products W_o^h W_v (all query heads
  h of the group share W_v) weighted by the attention input correlation (C = S Sᵀ): truncated
  SVD of [W_o^h]_h [W_v b_v] S, so the value head keeps r slots and each W_o^h reads only them.

**Allocation** (the paper's global sparsity allocation): block importance = Block Influence
s_ℓ = 1 − E[cos(h_in, h_out)] on the dense model; block sparsity φ_ℓ ∝ softmax(−s_ℓ/ε)
(the entropy-regularised solution), scaled so the kept parameters hit the asked ratio, capped at
``MAX_SPARSITY``; the same φ_ℓ applies to the block's three pairs, and a final pass adds or removes
single MLP neurons so the achieved ratio is within one neuron (3·hidden parameters) of the asked one.

Layout (never the model's name): every block needs an attention module with ``nn.Linear``
children ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and an MLP with ``gate_proj``, ``up_proj``,
``down_proj``; heads from the HF config (``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``partial_rotary_factor``), checked against the weight shapes. Anything else
(GPT-2's fused Conv1D ``c_attn``, MLPs without a gate, per-head q/k norms) is a one-line error
naming the module.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.compression.runner import SPILL_BYTES, BlockRunner, block_output, find_blocks
from rankwise.engine.device import stats_device
from rankwise.engine.linalg import least_squares, orthonormal_basis, sym_eigh
from rankwise.engine.svd import thin_svd
from rankwise.engine.whitening import cholesky_factor
from rankwise.errors import RankwiseError
from rankwise.surgery.select import SelectLinear
from rankwise.surgery.targets import Target

#: entropic temperature ε of the global allocation (φ_ℓ ∝ softmax(−s_ℓ/ε)); not tuned
EPSILON = 0.1
#: no block loses more than this fraction of its parameters
MAX_SPARSITY = 0.9
#: MLP neurons are kept in multiples of this: CPU GEMM kernels are 1.5–2× slower on widths that are not
#: (SmolLM2's up_proj for 512 tokens, one thread: 1,500 rows 38 ms, 1,488 rows 20 ms, all 1,536 rows 25 ms;
#: bench/results/compress_speed_auto.json has the per-layer timings that showed it). Small MLPs get a finer grid.
MLP_MULTIPLE = 16


def mlp_quantum(inter: int) -> int:
    """Granularity of the kept MLP width: :data:`MLP_MULTIPLE`, finer for MLPs narrower than 1,024."""
    return max(1, min(MLP_MULTIPLE, inter // 64))
#: ridge of the leverage scores, relative to the mean eigenvalue of C_σ
RIDGE = 1.0
#: damping of the Nyström solve, relative to mean(diag C_σ[S,S])
NYSTROM_DAMP = 1e-8

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


# -- layout ----------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where a block's attention and MLP linears are and the head geometry (from the HF config)."""

    block: str  # full module name of the block
    attn: str  # attention module, relative to the block ("self_attn")
    mlp: str  # MLP module, relative to the block
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    units: list[list[int]]  # head dimensions kept or dropped together (RoPE pairs, then single dims)
    biases: dict[str, bool] = field(default_factory=dict)

    def rel(self, leaf: str) -> str:
        """Name of a linear relative to the block (``self_attn.q_proj``)."""
        sub = self.attn if leaf in _ATTN else self.mlp
        return f"{sub}.{leaf}" if sub else leaf

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def dense_params(self) -> int:
        return self.params(self.inter, len(self.units), self.head_dim)

    def unit_dims(self, n_units: int) -> int:
        """Head dimensions of the ``n_units`` smallest units (used for the parameter count: units of a pair are 2)."""
        sizes = sorted(len(u) for u in self.units)
        return sum(sizes[-n_units:]) if n_units else 0

    def params(self, k_mlp: int, n_units: int, k_vo: int, qk_dims: int | None = None) -> int:
        """Weights of the block's seven linears at these sizes (m·n each, biases not counted)."""
        d = self.hidden
        dims = self.unit_dims(n_units) if qk_dims is None else qk_dims
        return 3 * d * k_mlp + (self.heads + self.kv_heads) * dims * d + (self.kv_heads + self.heads) * k_vo * d


def _describe(block: nn.Module) -> str:
    from rankwise.surgery.targets import is_matrix_module

    found = [f"{n} ({type(m).__name__})" for n, m in block.named_modules() if n and is_matrix_module(m)]
    return ", ".join(found[:6]) + (", …" if len(found) > 6 else "") if found else "no linear layers"


def _find(block: nn.Module, leaves: tuple[str, ...]) -> str | None:
    for name, mod in block.named_modules():
        if all(isinstance(getattr(mod, leaf, None), nn.Module) for leaf in leaves):
            return name
    return None


def block_layout(name: str, block: nn.Module, hf_config: Any) -> Layout:
    """The :class:`Layout` of block ``name`` (one-line :class:`RankwiseError` naming the module otherwise)."""
    attn, mlp = _find(block, _ATTN), _find(block, _MLP)
    if attn is None:
        raise RankwiseError(
            f"--method modegpt cannot decompose the attention of {name}: it needs separate nn.Linear q_proj, k_proj, "
            f"v_proj, o_proj (its linear layers: {_describe(block)}); use another --method.")
    if mlp is None:
        raise RankwiseError(
            f"--method modegpt cannot decompose the MLP of {name}: it needs a gated MLP with nn.Linear gate_proj, "
            f"up_proj, down_proj (its linear layers: {_describe(block)}); use another --method.")
    amod = block.get_submodule(attn)
    for extra in ("q_norm", "k_norm"):
        if isinstance(getattr(amod, extra, None), nn.Module):
            raise RankwiseError(f"--method modegpt cannot decompose {name}.{attn}: its per-head {extra} normalises "
                                "over head_dim, which dropping query/key dimensions would change; use another "
                                "--method.")
    mods = {leaf: block.get_submodule(f"{attn}.{leaf}" if attn else leaf) for leaf in _ATTN}
    mods.update({leaf: block.get_submodule(f"{mlp}.{leaf}" if mlp else leaf) for leaf in _MLP})
    for leaf, mod in mods.items():
        if type(mod) is not nn.Linear:
            where = f"{name}.{attn if leaf in _ATTN else mlp}.{leaf}".replace("..", ".")
            raise RankwiseError(f"--method modegpt cannot decompose {where}: it is a {type(mod).__name__}, not an "
                                "nn.Linear (already compressed, or a fused/Conv1D layout); use another --method.")
    heads = getattr(hf_config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise RankwiseError(f"--method modegpt needs num_attention_heads in the model config to split {name}.{attn} "
                            "into heads; this config has none.")
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    d = mods["q_proj"].in_features
    hd = getattr(hf_config, "head_dim", None) or d // heads
    inter = mods["gate_proj"].out_features
    want = {"q_proj": (heads * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d), "o_proj": (d, heads * hd),
            "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    for leaf, shape in want.items():
        got = (mods[leaf].out_features, mods[leaf].in_features)
        if got != shape or heads % kv:
            raise RankwiseError(
                f"--method modegpt: {name}.{leaf} is {got[0]}×{got[1]}, but num_attention_heads={heads}, "
                f"num_key_value_heads={kv}, head_dim={hd} make it {shape[0]}×{shape[1]}; the attention layout "
                "is not the q/k/v/o one modegpt decomposes.")
    rot = int(hd * float(getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0))
    rot -= rot % 2
    units = [[i, i + rot // 2] for i in range(rot // 2)] + [[i] for i in range(rot, hd)]
    biases = {leaf: mods[leaf].bias is not None for leaf in mods}
    return Layout(block=name, attn=attn, mlp=mlp, hidden=d, inter=inter, heads=heads, kv_heads=kv, head_dim=hd,
                  units=units, biases=biases)


# -- statistics ------------------------------------------------------------------------------------------


@dataclass
class BlockStats:
    """Float64 sums over the calibration tokens of one block."""

    xtx: torch.Tensor | None = None  # attention input: Σ x xᵀ
    xsum: torch.Tensor | None = None  # attention input: Σ x
    ztz: torch.Tensor | None = None  # down_proj input: Σ z zᵀ
    rows: int = 0
    cos_sum: float = 0.0  # Σ cos(h_in, h_out) (block influence)
    cos_rows: int = 0


class _Collector:
    """Hooks on one block: second moments of the attention and down_proj inputs, and/or block influence."""

    def __init__(self, block: nn.Module, layout: Layout, sdev: torch.device, skip_first: int,
                 moments: bool, influence: bool, chunk_rows: int = 1024) -> None:
        self.block, self.layout, self.sdev, self.skip = block, layout, sdev, skip_first
        self.moments, self.influence, self.chunk = moments, influence, chunk_rows
        self.stats = BlockStats()
        self._handles: list = []

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.skip and x.dim() >= 3 and x.shape[-2] > self.skip:
            x = x[..., self.skip :, :]
        return x.reshape(-1, x.shape[-1])

    def _gram(self, acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if acc is None:
            acc = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=self.sdev)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32  # float32 chunks, float64 sum
        for i in range(0, x.shape[0], self.chunk):
            xc = x[i : i + self.chunk].to(dt)
            acc.add_((xc.T @ xc).to(self.sdev))
        return acc

    def __enter__(self) -> _Collector:
        st, lay = self.stats, self.layout
        if self.moments:
            def attn_in(_mod: nn.Module, args: tuple) -> None:
                x = self._rows(args[0])
                st.xtx = self._gram(st.xtx, x)
                s = x.to(torch.float64).sum(0).to(self.sdev)
                st.xsum = s if st.xsum is None else st.xsum.add_(s)
                st.rows += x.shape[0]

            def down_in(_mod: nn.Module, args: tuple) -> None:
                st.ztz = self._gram(st.ztz, self._rows(args[0]))

            self._handles.append(self.block.get_submodule(lay.rel("q_proj")).register_forward_pre_hook(attn_in))
            self._handles.append(self.block.get_submodule(lay.rel("down_proj")).register_forward_pre_hook(down_in))
        if self.influence:
            def bi(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                h_in = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
                if not isinstance(h_in, torch.Tensor):
                    return
                a, b = self._rows(h_in).float(), self._rows(block_output(out)).float()
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
                st.cos_sum += float(cos.double().sum())
                st.cos_rows += cos.numel()

            self._handles.append(self.block.register_forward_hook(bi, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _reduce(dist: Any, st: BlockStats) -> None:
    """Sum one block's statistics over the processes (no-op on one process)."""
    if not getattr(dist, "enabled", False):
        return
    for t in (st.xtx, st.xsum, st.ztz):
        if t is not None:
            dist.all_reduce_(t)
    extra = torch.tensor([float(st.rows), st.cos_sum, float(st.cos_rows)], dtype=torch.float64,
                         device=st.xtx.device if st.xtx is not None else "cpu")
    dist.all_reduce_(extra)
    st.rows, st.cos_sum, st.cos_rows = int(extra[0]), float(extra[1]), int(extra[2])


# -- the three decompositions (float64) ------------------------------------------------------------------


def _augmented(st: BlockStats) -> torch.Tensor:
    """E-free second moment of x̃ = [x; 1] (so a bias is one more input column): [[XᵀX, Σx], [Σxᵀ, N]]."""
    if st.xtx is None or st.xsum is None:
        raise RuntimeError("rankwise bug: modegpt statistics missing")
    n = st.xtx.shape[0]
    C = torch.empty(n + 1, n + 1, dtype=torch.float64, device=st.xtx.device)
    C[:n, :n] = st.xtx
    C[:n, n] = st.xsum
    C[n, :n] = st.xsum
    C[n, n] = float(st.rows)
    return C


def _with_bias(lin: nn.Linear, dev: torch.device) -> torch.Tensor:
    """[W b] in float64 (b = 0 without a bias)."""
    W = lin.weight.detach().to(dev, torch.float64)
    b = lin.bias.detach().to(dev, torch.float64) if lin.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype,
                                                                                          device=dev)
    return torch.cat([W, b[:, None]], dim=1)


def nystrom_mlp(gate: nn.Linear, up: nn.Linear, down: nn.Linear, ztz: torch.Tensor, k: int,
                ridge: float = RIDGE) -> tuple[SelectLinear, SelectLinear, SelectLinear, torch.Tensor]:
    """MLP pair at k intermediate neurons: ridge-leverage selection of C_σ and the Nyström down_proj."""
    dev = ztz.device
    ztz = ztz.detach()
    C = 0.5 * (ztz + ztz.T)
    n = C.shape[0]
    lam, Q = sym_eigh(C)
    lam = lam.clamp_min(0)
    reg = ridge * float(lam.mean().clamp_min(1e-30))
    lev = (Q * Q) @ (lam / (lam + reg))
    S = torch.sort(torch.topk(lev, k).indices).values if k < n else torch.arange(n, device=dev)
    Css = C[S][:, S]
    damp = NYSTROM_DAMP * float(Css.diagonal().mean().clamp_min(1e-30))
    Css = Css + damp * torch.eye(k, dtype=C.dtype, device=dev)
    Wd = down.weight.detach().to(dev, torch.float64)
    X = least_squares(Css, C[S] @ Wd.T)  # (k × d): C_SS⁻¹ C_S: W_dᵀ
    dt = down.weight.dtype
    wdev = down.weight.device

    def rows(lin: nn.Linear) -> SelectLinear:
        b = lin.bias.detach()[S.to(wdev)] if lin.bias is not None else None
        return SelectLinear.from_weight(lin.weight.detach()[S.to(wdev)], b, lin.in_features, lin.out_features,
                                        out_index=S, scatter_out=False, dtype=dt)

    new_down = SelectLinear.from_weight(X.T.to(wdev, torch.float32).contiguous(), down.bias.detach() if down.bias
                                        is not None else None, down.in_features, down.out_features, in_index=S,
                                        gather_in=False, dtype=dt)
    return rows(gate), rows(up), new_down, S


def _row_energy(lin: nn.Linear, C: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of each output squared (bias included): diag([W b] C̃ [W b]ᵀ)."""
    Wb = _with_bias(lin, C.device)
    return ((Wb @ C) * Wb).sum(1)


def cr_query_key(q: nn.Linear, k: nn.Linear, C: torch.Tensor, layout: Layout, n_units: int
                 ) -> tuple[SelectLinear, SelectLinear, torch.Tensor]:
    """Query–key pair keeping ``n_units`` units per key/value group (CR decomposition; C: augmented moment)."""
    hd, G = layout.head_dim, layout.group
    eq = _row_energy(q, C).view(layout.heads, hd)
    ek = _row_energy(k, C).view(layout.kv_heads, hd)
    eq = eq.view(layout.kv_heads, G, hd).sum(1)  # the group's query heads share the key dimensions
    units = [torch.tensor(u, device=C.device) for u in layout.units]
    keep_k = []
    for g in range(layout.kv_heads):
        score = torch.stack([eq[g, u].sum().clamp_min(0).sqrt() * ek[g, u].sum().clamp_min(0).sqrt() for u in units])
        top = torch.topk(score, n_units).indices.tolist() if n_units < len(units) else range(len(units))
        dims = sorted(i for j in top for i in layout.units[j])
        keep_k.append(torch.tensor(dims, dtype=torch.long))
    k_idx = torch.cat([g * hd + d for g, d in enumerate(keep_k)])
    q_idx = torch.cat([(g * G + h) * hd + keep_k[g] for g in range(layout.kv_heads) for h in range(G)])

    def rows(lin: nn.Linear, idx: torch.Tensor) -> SelectLinear:
        idx = idx.to(lin.weight.device)
        b = lin.bias.detach()[idx] if lin.bias is not None else None
        return SelectLinear.from_weight(lin.weight.detach()[idx], b, lin.in_features, lin.out_features,
                                        out_index=idx, scatter_out=True)

    return rows(q, q_idx), rows(k, k_idx), k_idx


def svd_value_output(v: nn.Linear, o: nn.Linear, C: torch.Tensor, layout: Layout, rank: int, jitter: float = 1e-6
                     ) -> tuple[SelectLinear, SelectLinear]:
    """Value–output pair at ``rank`` slots per key/value head: whitened SVD of the stacked products W_o^h [W_v b_v]."""
    hd, G, d = layout.head_dim, layout.group, layout.hidden
    dev = C.device
    if v.bias is None:  # no constant input column: the fit must not invent a bias the dense layout lacks
        C = C[:d, :d]
    wf = cholesky_factor(C, jitter=jitter, name=f"{layout.block} attention input", warn=False)
    Wv = _with_bias(v, dev)[:, : C.shape[0]]  # (KV·hd) × (d[+1])
    Wo = o.weight.detach().to(dev, torch.float64)  # d × (H·hd)
    new_v, new_o = [], []
    for g in range(layout.kv_heads):
        Wvg = Wv[g * hd : (g + 1) * hd]  # hd × (d+1)
        stack = torch.cat([Wo[:, (g * G + h) * hd : (g * G + h + 1) * hd] for h in range(G)], dim=0)  # G·d × hd
        Qb = orthonormal_basis(stack)
        R = Qb.T @ stack  # stack = Qb R (reduced QR)
        U, s, Vh = thin_svd(R @ Wvg @ wf.S)
        U, s, Vh = U[:, :rank], s[:rank], Vh[:rank]
        new_v.append((s[:, None] * Vh) @ wf.S_inv)  # rank × (d[+1]): the value slots (weight [and bias])
        Ob = Qb @ U  # G·d × rank
        new_o.extend(Ob[h * d : (h + 1) * d] for h in range(G))
    Vt = torch.cat(new_v, 0)
    wdev, dt = v.weight.device, v.weight.dtype
    v_idx = torch.cat([g * hd + torch.arange(rank) for g in range(layout.kv_heads)]).to(wdev)
    o_idx = torch.cat([h * hd + torch.arange(rank) for h in range(layout.heads)]).to(wdev)
    vb = Vt[:, d].to(wdev, torch.float32) if v.bias is not None else None
    new_vl = SelectLinear.from_weight(Vt[:, :d].to(wdev, torch.float32).contiguous(), vb, v.in_features,
                                      v.out_features, out_index=v_idx, scatter_out=True, dtype=dt)
    new_ol = SelectLinear.from_weight(torch.cat(new_o, 1).to(wdev, torch.float32).contiguous(),
                                      o.bias.detach() if o.bias is not None else None, o.in_features, o.out_features,
                                      in_index=o_idx, gather_in=True, dtype=o.weight.dtype)
    return new_vl, new_ol


# -- allocation ------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    """What one block keeps: MLP neurons, query/key units per group, value/output rank per group."""

    mlp: int
    qk_units: int
    vo: int


@dataclass
class ModegptAllocation:
    """The allocation record (``ranks``/``achieved_ratio``/``info`` like the other allocators)."""

    sizes: list[Sizes]
    sparsity: list[float]
    influence: list[float]
    achieved_ratio: float
    info: dict = field(default_factory=dict)


def _sizes_at(lay: Layout, phi: float) -> Sizes:
    keep = 1.0 - phi
    q = mlp_quantum(lay.inter)
    return Sizes(mlp=max(q, min(lay.inter, q * round(keep * lay.inter / q))),
                 qk_units=max(1, min(len(lay.units), round(keep * len(lay.units)))),
                 vo=max(1, min(lay.head_dim, round(keep * lay.head_dim))))


def allocate_sparsity(influence: list[float], layouts: list[Layout], ratio: float, fixed_params: int,
                      epsilon: float = EPSILON, cap: float = MAX_SPARSITY) -> ModegptAllocation:
    """Block sparsities φ_ℓ = min(cap, t·softmax(−s_ℓ/ε)) with t set so the targeted parameters drop by ``ratio``.

    ``fixed_params``: targeted weights outside the blocks (kept dense). The last step moves single
    MLP neurons (given back to the most influential blocks, taken from the least) until the removed
    count is within half a neuron of the target, so the achieved ratio matches within one rank step.
    """
    s = torch.tensor(influence, dtype=torch.float64)
    w = torch.softmax(-s / epsilon, dim=0) * len(influence)  # mean 1: φ_ℓ = t·w_ℓ, t ≈ ratio
    dense = [lay.dense_params() for lay in layouts]
    total = sum(dense) + fixed_params
    target = ratio * total

    def removed(t: float) -> tuple[int, list[Sizes], list[float]]:
        phis = [min(cap, t * float(x)) for x in w]
        sizes = [_sizes_at(lay, p) for lay, p in zip(layouts, phis)]
        kept = sum(lay.params(sz.mlp, sz.qk_units, sz.vo) for lay, sz in zip(layouts, sizes))
        return sum(dense) - kept, sizes, phis

    hi = cap / float(w.min()) + 1.0
    if removed(hi)[0] < target:
        raise RankwiseError(f"ratio {ratio} is out of reach for modegpt: no block may lose more than {cap:.0%} of its "
                            "parameters; ask for a smaller ratio.")
    lo = 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if removed(mid)[0] < target:
            lo = mid
        else:
            hi = mid
    _, sizes, phis = removed(hi)
    # fine step: MLP neurons in groups of mlp_quantum (3·hidden parameters each), the smallest unit of the pairs
    order = sorted(range(len(layouts)), key=lambda i: influence[i])  # least influential first
    kept = sum(lay.params(sz.mlp, sz.qk_units, sz.vo) for lay, sz in zip(layouts, sizes))
    excess = (sum(dense) - kept) - target  # > 0: removed too much
    for i in reversed(order) if excess > 0 else order:  # give back to important blocks, take from the others
        lay, sz = layouts[i], sizes[i]
        q = mlp_quantum(lay.inter)
        step = 3 * lay.hidden * q
        while abs(excess) > step / 2:
            if excess > 0 and sz.mlp + q <= lay.inter:
                sz.mlp += q
                excess -= step
            elif excess < 0 and sz.mlp - q >= max(q, (1 - cap) * lay.inter):
                sz.mlp -= q
                excess += step
            else:
                break
    kept = sum(lay.params(sz.mlp, sz.qk_units, sz.vo) for lay, sz in zip(layouts, sizes))
    achieved = 1.0 - (kept + fixed_params) / total
    info = {"epsilon": epsilon, "cap": cap, "scale": hi, "importance": "block influence (1 - cos)"}
    return ModegptAllocation(sizes=sizes, sparsity=phis, influence=list(influence), achieved_ratio=achieved,
                             info=info)


# -- one block -------------------------------------------------------------------------------------------


def compress_block(block: nn.Module, layout: Layout, st: BlockStats, sizes: Sizes, force: bool = False,
                   jitter: float = 1e-6) -> dict[str, int]:
    """Replace the block's seven linears by MoDeGPT's (in place); returns {relative name: kept rows or columns}.

    A pair at full size stays dense unless ``force`` (tests: the decomposition at full size is exact).
    """
    from rankwise.surgery.modules import set_module

    if st.xtx is None or st.ztz is None or st.rows == 0:
        raise RankwiseError(f"block {layout.block} received no calibration input; the forward loop must run the "
                            "whole model.")
    for t in (st.xtx, st.ztz):
        if not bool(torch.isfinite(t).all()):
            raise RankwiseError(f"calibration statistics of {layout.block} contain NaN/inf; check the model weights.")
    mod = {leaf: block.get_submodule(layout.rel(leaf)) for leaf in _ATTN + _MLP}
    kept: dict[str, int] = {}
    if force or sizes.mlp < layout.inter:
        g, u, dn, _ = nystrom_mlp(mod["gate_proj"], mod["up_proj"], mod["down_proj"], st.ztz, sizes.mlp)
        for leaf, new in (("gate_proj", g), ("up_proj", u), ("down_proj", dn)):
            set_module(block, layout.rel(leaf), new)
            kept[layout.rel(leaf)] = sizes.mlp
    C = _augmented(st)
    if force or sizes.qk_units < len(layout.units):
        nq, nk, _ = cr_query_key(mod["q_proj"], mod["k_proj"], C, layout, sizes.qk_units)
        set_module(block, layout.rel("q_proj"), nq)
        set_module(block, layout.rel("k_proj"), nk)
        kept[layout.rel("q_proj")] = nq.rows
        kept[layout.rel("k_proj")] = nk.rows
    if force or sizes.vo < layout.head_dim:
        nv, no = svd_value_output(mod["v_proj"], mod["o_proj"], C, layout, sizes.vo, jitter=jitter)
        set_module(block, layout.rel("v_proj"), nv)
        set_module(block, layout.rel("o_proj"), no)
        kept[layout.rel("v_proj")] = nv.rows
        kept[layout.rel("o_proj")] = no.cols
    return kept


# -- the pipeline ----------------------------------------------------------------------------------------


def plan_modegpt(model: nn.Module, targets: list[Target], config: Any, *, has_data: bool
                 ) -> tuple[Any, list[Layout], int]:
    """Check that MoDeGPT can run on ``model`` with ``config`` and return its plan, before any work.

    Returns ``(blocks, layouts, fixed)``: the decoder blocks, each block's :class:`Layout` and the targeted
    weights outside their seven linears (kept dense). Raises a one-line
    :class:`RankwiseError` naming the option or module that prevents it (``method="auto"`` uses the message as
    its reason to fall back to ``whiten``).
    """
    if config.targets is not None or config.exclude is not None:
        raise RankwiseError("--method modegpt decomposes whole blocks (attention and MLP together); it does not take "
                            "--targets/--exclude.")
    if not has_data:
        raise RankwiseError("--method modegpt needs calibration data (text or token windows).")
    if getattr(config, "heal_steps", 0):
        raise RankwiseError("--heal-steps adapts low-rank factors, and --method modegpt makes none (it keeps rows and "
                            "columns); drop --heal-steps or use another --method.")
    blocks = find_blocks(model, targets)
    if blocks is None:
        raise RankwiseError("--method modegpt found no repeated decoder blocks holding the targeted layers.")
    hf_config = getattr(model, "config", None)
    hf_config = getattr(hf_config, "get_text_config", lambda: hf_config)() if hf_config is not None else None
    layouts = [block_layout(f"{blocks.prefix}.{i}", b, hf_config) for i, b in enumerate(blocks.modules)]
    names = {f"{lay.block}.{lay.rel(leaf)}" for lay in layouts for leaf in _ATTN + _MLP}
    by_name = {t.name: t for t in targets}
    missing = sorted(names - set(by_name))
    if missing:
        raise RankwiseError(f"--method modegpt needs {missing[0]} among the targeted layers; it is not one.")
    fixed = sum(m * n for t in targets if t.name not in names for m, n in [t.shape])
    return blocks, layouts, fixed


def run_modegpt(
    model: nn.Module,
    targets: list[Target],
    config: Any,
    *,
    device: torch.device,
    loop: Callable[[nn.Module], Any] | None,
    load: Callable[[int, nn.Module], None] | None = None,
    release: Callable[[int, nn.Module], None] | None = None,
    on_block_done: Callable[[int, nn.Module], None] | None = None,
    spill_bytes: int = SPILL_BYTES,
    runners: list | None = None,
    **_: Any,
) -> Any:
    """MoDeGPT through the one block runner: influence pass (dense), allocation, statistics + decomposition pass.

    Returns the :class:`rankwise.compression.api.PipelineResult` of the run (``rank_of``: kept rows of
    q/k/v/gate/up and kept columns of o/down, None for matrices left dense; ``targeted_after``: the
    targeted weights left).
    """
    from rankwise.compression.api import PipelineResult, _dist

    blocks, layouts, fixed = plan_modegpt(model, targets, config, has_data=loop is not None)
    dist = _dist(device)
    sdev = stats_device(device)
    timings: dict[str, float] = {}

    def runner() -> BlockRunner:
        r = BlockRunner(model, blocks, loop, device=device, load=load, release=release, spill_bytes=spill_bytes,
                        progress=config.progress)
        if runners is not None:
            runners.append(r)
        return r

    # 1. block influence of the dense model
    t0 = time.perf_counter()
    influence = [0.0] * len(layouts)
    cur: dict[str, _Collector] = {}

    @contextlib.contextmanager
    def influence_collect(i: int) -> Iterator[None]:
        with _Collector(blocks.modules[i], layouts[i], sdev, config.skip_first, moments=False, influence=True) as c:
            cur["c"] = c
            yield

    def influence_visit(i: int, _block: nn.Module) -> bool:
        st = cur.pop("c").stats
        _reduce(dist, st)
        if st.cos_rows == 0:
            raise RankwiseError(f"block {layouts[i].block} received no calibration input.")
        influence[i] = 1.0 - st.cos_sum / st.cos_rows
        return False

    with runner() as r:
        r.walk(influence_visit, collect=influence_collect, sequential=False, desc="modegpt: block influence")
    timings["influence"] = time.perf_counter() - t0

    # 2. allocation
    t1 = time.perf_counter()
    alloc = allocate_sparsity(influence, layouts, config.ratio, fixed)
    timings["allocation"] = time.perf_counter() - t1

    # 3. statistics + decomposition, block by block (sequential: block ℓ sees the compressed blocks < ℓ)
    t2 = time.perf_counter()
    rank_of: dict[str, int | None] = {t.name: None for t in targets}
    left: dict[str, int] = {}  # weights of each replaced matrix

    @contextlib.contextmanager
    def stats_collect(i: int) -> Iterator[None]:
        with _Collector(blocks.modules[i], layouts[i], sdev, config.skip_first, moments=True, influence=False) as c:
            cur["c"] = c
            yield

    def decompose(i: int, block: nn.Module) -> bool:
        st = cur.pop("c").stats
        _reduce(dist, st)
        kept = compress_block(block, layouts[i], st, alloc.sizes[i], jitter=config.jitter)
        for rel, k in kept.items():
            rank_of[f"{layouts[i].block}.{rel}"] = k
            left[f"{layouts[i].block}.{rel}"] = block.get_submodule(rel).weight.numel()
        if on_block_done is not None:
            on_block_done(i, block)
        return bool(kept)

    with runner() as r:
        r.walk(decompose, collect=stats_collect, sequential=bool(config.sequential), desc="modegpt: decompose")
    timings["factorisation"] = time.perf_counter() - t2
    after = sum(left.get(t.name, t.shape[0] * t.shape[1]) for t in targets)
    total = sum(t.shape[0] * t.shape[1] for t in targets)
    alloc.achieved_ratio = 1.0 - after / total  # the planned count, unless partial-rotary units differ in size
    alloc.info.update({"influence": [round(x, 6) for x in influence],
                       "sparsity": [round(p, 6) for p in alloc.sparsity],
                       "sizes": [[sz.mlp, sz.qk_units, sz.vo] for sz in alloc.sizes]})
    return PipelineResult(rank_of=rank_of, alloc=alloc, sequential=bool(config.sequential), timings=timings,
                          targeted_after=after)
