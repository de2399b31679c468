"""DejaVu contextual sparsity (SPECS.md section 4): gathered sparse MLPs and attention heads,
low-rank predictors of the active set, and the utilities that train them.

Kernels: :func:`sparse_mlp` (and the attention-head helpers) call the ``torch.ops.effx``
sparse operators; everything here is glue. Layout: the down projection (and the attention
output projection) is stored TRANSPOSED, ``[n, d]``, so a selected neuron (head) is one
contiguous row (block of rows).

Skipped attention heads and later tokens: :func:`sparse_head_qkv` computes the query only for
the selected heads but keys and values for EVERY kv-head, so the KV cache never misses a
token of a skipped head; a head picked at a later step attends over complete keys and values
and gives exactly what dense attention gives for that head. With GQA the K/V projections are
the small ones (``num_kv_heads * head_dim`` rows each), so this costs less than recomputing
K/V lazily from stored hidden states (the reference's approach) and needs no window.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
from torch import nn

from effx import ops

__all__ = [
    "sparse_mlp",
    "sparse_head_qkv",
    "sparse_head_out",
    "kv_heads_of",
    "SparsePredictor",
    "SparseMLP",
    "PredictorReport",
    "record_activations",
    "activation_labels",
    "head_labels",
    "train_predictor",
    "recall_at_k",
]

_ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")


def _kernel_activation(activation: str, w_gate: torch.Tensor | None) -> str:
    if activation == "swiglu":
        if w_gate is None:
            raise ValueError("effx.sparse: activation 'swiglu' needs w_gate")
        return "silu"
    return activation


def sparse_mlp(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    activation: str = "relu",
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    *,
    b_gate: torch.Tensor | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """The MLP restricted to the neurons ``idx``: ``act(x W1[idx]^T + b1[idx]) W2t[idx] + b2``.

    With ``w_gate`` the hidden layer is gated, ``act(x Wg[idx]^T + bg[idx]) * (x W1[idx]^T + b1[idx])``:
    ``activation="silu"`` (or ``"swiglu"``) is Llama's SwiGLU.

    Args:
        x: ``[B, d]`` (or ``[..., d]`` with a shared ``idx``), float32/float16/bfloat16.
        w_up, w_gate: ``[n, d]`` (``nn.Linear.weight`` of the up / gate projection).
        w_down_t: ``[n, d_out]``, the down projection's ``nn.Linear.weight`` TRANSPOSED.
        idx: integer tensor of distinct neurons in ``[0, n)``: ``[k]`` shared by the batch or
            ``[B, k]`` one set per row; any ``k`` from 0 (the result is ``b_down``) to ``n``.
        activation: ``relu``, ``gelu``, ``gelu_tanh``, ``silu``, ``swiglu`` or ``none``.
        b_up: ``[n]``; b_down: ``[d_out]``; b_gate: ``[n]`` (gated only).
        check_indices: raise on out-of-range or repeated indices (on CUDA this reads the indices
            on the host, i.e. waits for the stream; top-k indices may skip it).

    Returns:
        ``[B, d_out]`` (``[..., d_out]``) in the dtype of ``x``; deterministic.
    """
    act = _kernel_activation(activation, w_gate)
    lead = x.shape[:-1]
    if idx.dim() == 1:
        x2 = x.reshape(-1, x.shape[-1])
    elif x.dim() == 2:
        x2 = x
    else:
        x2 = x.reshape(-1, x.shape[-1])
        idx = idx.reshape(-1, idx.shape[-1])
    y = ops.sparse_mlp(x2, w_up, w_down_t, idx, act, w_gate, b_up, b_down, b_gate, check_indices)
    return y.reshape(*lead, y.shape[-1])


# --- attention-head sparsity


def kv_heads_of(heads: torch.Tensor, num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The kv-head each selected query head reads under GQA (``head // (Hq / Hkv)``)."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"effx.sparse.kv_heads_of: num_kv_heads ({num_kv_heads}) must divide "
                         f"num_q_heads ({num_q_heads})")
    return torch.div(heads, num_q_heads // num_kv_heads, rounding_mode="floor")


def sparse_head_qkv(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    heads: torch.Tensor,
    head_dim: int,
    *,
    b_q: torch.Tensor | None = None,
    b_k: torch.Tensor | None = None,
    b_v: torch.Tensor | None = None,
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QKV projection of one token per row with only the query heads ``heads`` computed.

    Args:
        x: ``[B, d]``; w_q ``[Hq * D, d]``; w_k, w_v ``[Hkv * D, d]`` (``nn.Linear.weight``).
        heads: selected query heads, ``[k]`` shared by the batch or ``[B, k]``.
        head_dim: ``D``.

    Returns:
        ``(q, k, v)``: ``q`` ``[B, k, D]`` for the selected heads in the order of ``heads``;
        ``k`` and ``v`` ``[B, Hkv, D]`` for ALL kv-heads, so the cache stays complete for
        heads skipped now and selected later (module docstring).
    """
    q = ops.sparse_mlp_up(x, w_q, heads, "none", None, b_q, None, head_dim, check_indices)
    k = torch.nn.functional.linear(x, w_k, b_k)
    v = torch.nn.functional.linear(x, w_v, b_v)
    batch = x.shape[0]
    return (q.view(batch, heads.shape[-1], head_dim), k.view(batch, -1, head_dim),
            v.view(batch, -1, head_dim))


def sparse_head_out(
    o: torch.Tensor,
    w_o_t: torch.Tensor,
    heads: torch.Tensor,
    *,
    b_o: torch.Tensor | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """Output projection over the selected heads' slices only.

    Args:
        o: ``[B, k, D]`` attention outputs of the heads ``heads`` (in that order).
        w_o_t: ``[Hq * D, d]``, the output projection's ``nn.Linear.weight`` TRANSPOSED.
        heads: ``[k]`` or ``[B, k]`` as given to :func:`sparse_head_qkv`.

    Returns:
        ``[B, d]``: what the dense projection gives when the other heads' outputs are zero.
    """
    batch, k, head_dim = o.shape
    return ops.sparse_mlp_down(o.reshape(batch, k * head_dim), w_o_t, heads, b_o, head_dim, check_indices)


# --- predictors


class SparsePredictor(nn.Module):
    """Low-rank predictor of the active neurons (or heads): two bias-free linear layers
    ``d -> rank -> n`` with no nonlinearity between them; outputs logits."""

    def __init__(self, d_model: int, n_out: int, rank: int = 1000, *, device=None, dtype=None):
        super().__init__()
        rank = min(rank, d_model, n_out)
        self.d_model, self.n_out, self.rank = d_model, n_out, rank
        self.proj = nn.Linear(d_model, rank, bias=False, device=device, dtype=dtype)
        self.out = nn.Linear(rank, n_out, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(x))

    @torch.no_grad()
    def select(self, x: torch.Tensor, k: int, *, per_row: bool = False) -> torch.Tensor:
        """Indices of the ``k`` most likely active units, ascending.

        ``per_row=False``: one set for the whole batch ``x [..., d]`` (``[k]``), ranked by the
        largest logit any row gives a unit, so a unit that one row needs is kept; the sparse
        kernels then read each selected weight row once for the batch. ``per_row=True``:
        ``[B, k]`` (``x`` must be ``[B, d]``).
        """
        logits = self(x.to(self.proj.weight.dtype))
        k = max(0, min(k, self.n_out))
        if per_row:
            return logits.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
        score = logits.reshape(-1, self.n_out).amax(0)
        return score.topk(k, sorted=False).indices.sort().values


@dataclasses.dataclass
class PredictorReport:
    """How a trained predictor did on held-out rows."""

    k: int
    recall: float  # mean fraction of truly active units found in the top-k predictions
    loss: float  # final validation BCE (with positive-class reweighting)
    positive_fraction: float  # fraction of active labels in the training data
    train_rows: int
    val_rows: int


def record_activations(
    model: nn.Module,
    batches: Iterable,
    points: dict[str, tuple[nn.Module, nn.Module]],
    *,
    max_rows: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model`` on ``batches`` and record, per point, predictor inputs and hidden activations.

    Each point is ``(input_module, hidden_module)``: the first positional input of
    ``input_module`` is the predictor input (the transformer block, whose input is the
    residual stream before normalization), the first positional input of ``hidden_module`` is
    the hidden activation (the down projection / ``fc2``, whose input is ``act(...)`` or
    ``act(gate) * up``; for heads, the output projection). Pairing layer ``l``'s block with
    layer ``l + 1``'s down projection records data for a look-ahead predictor.

    Forward pre-hooks are used, so any torch model works; they are removed on return. Rows are
    tokens (leading dims flattened), kept in order, moved to the CPU.

    Args:
        batches: model inputs; a tuple is unpacked as positional args, a dict as keyword args.
        max_rows: stop recording a point after this many rows.

    Returns:
        name -> ``(inputs [N, d], hidden [N, n])`` (float32).
    """
    store: dict[str, dict[str, list[torch.Tensor]]] = {name: {"x": [], "h": []} for name in points}
    handles = []

    def hook(name: str, key: str):
        def fn(module, args):
            t = args[0].detach()
            store[name][key].append(t.reshape(-1, t.shape[-1]).float().cpu())
        return fn

    try:
        for name, (input_module, hidden_module) in points.items():
            handles.append(input_module.register_forward_pre_hook(hook(name, "x")))
            handles.append(hidden_module.register_forward_pre_hook(hook(name, "h")))
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                if max_rows is not None and all(
                        sum(len(t) for t in s["x"]) >= max_rows for s in store.values()):
                    break
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, s in store.items():
        if not s["x"] or not s["h"]:
            raise RuntimeError(f"effx.sparse.record_activations: point '{name}' recorded nothing; "
                               "do its modules run in the model's forward?")
        x, h = torch.cat(s["x"]), torch.cat(s["h"])
        if len(x) != len(h):
            raise RuntimeError(f"effx.sparse.record_activations: point '{name}' saw {len(x)} input rows "
                               f"but {len(h)} hidden rows; pick modules that see the same tokens")
        if max_rows is not None:
            x, h = x[:max_rows], h[:max_rows]
        out[name] = (x, h)
    return out


def activation_labels(hidden: torch.Tensor, *, rule: str = "positive", k: int | None = None) -> torch.Tensor:
    """Labels "neuron active" from recorded hidden activations ``[N, n]`` (float 0/1).

    ``rule="positive"``: pre-activation > 0, i.e. ``hidden > 0`` for ReLU models.
    ``rule="topk"``: the ``k`` largest ``|hidden|`` of each row (SiLU/GELU/SwiGLU models).
    """
    if rule == "positive":
        return (hidden > 0).float()
    if rule == "topk":
        if k is None:
            raise ValueError("effx.sparse.activation_labels: rule 'topk' needs k")
        labels = torch.zeros_like(hidden, dtype=torch.float32)
        return labels.scatter_(-1, hidden.abs().topk(k, dim=-1).indices, 1.0)
    raise ValueError(f"effx.sparse.activation_labels: rule must be 'positive' or 'topk', got '{rule}'")


def head_labels(head_inputs: torch.Tensor, num_heads: int, fraction: float = 0.3) -> torch.Tensor:
    """Labels "head in the top ``fraction`` by output norm" from the recorded input of the
    attention output projection ``[N, num_heads * D]`` (float 0/1 ``[N, num_heads]``)."""
    norms = head_inputs.reshape(head_inputs.shape[0], num_heads, -1).norm(dim=-1)
    k = max(1, math.ceil(fraction * num_heads))
    return torch.zeros_like(norms).scatter_(-1, norms.topk(k, dim=-1).indices, 1.0)


def recall_at_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Mean over rows of |top-k(logits) ∩ active| / |active| (rows with no active unit count 1)."""
    top = torch.zeros_like(labels).scatter_(-1, logits.topk(k, dim=-1).indices, 1.0)
    hit = (top * labels).sum(-1)
    total = labels.sum(-1)
    return torch.where(total > 0, hit / total.clamp_min(1), torch.ones_like(total)).mean().item()


def train_predictor(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    rank: int = 1000,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[SparsePredictor, PredictorReport]:
    """Train a :class:`SparsePredictor` with BCE on ``labels`` (0/1 ``[N, n]``) from ``inputs``
    ``[N, d]``, weighting the positive class by (negatives / positives) so rare active units
    are not ignored; report recall at ``k`` on the last ``val_fraction`` of the rows."""
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"effx.sparse.train_predictor: inputs has {inputs.shape[0]} rows but labels "
                         f"{labels.shape[0]}")
    device = torch.device(device) if device is not None else inputs.device
    gen = torch.Generator().manual_seed(seed)
    x = inputs.float().to(device)
    y = labels.float().to(device)
    n_rows = x.shape[0]
    n_val = max(1, int(round(n_rows * val_fraction))) if n_rows > 1 else 0
    x_train, y_train = x[: n_rows - n_val], y[: n_rows - n_val]
    x_val, y_val = (x[n_rows - n_val:], y[n_rows - n_val:]) if n_val else (x_train, y_train)
    pos = y_train.mean().item()
    pos_weight = torch.tensor((1 - pos) / max(pos, 1e-6), device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = SparsePredictor(x.shape[1], y.shape[1], rank, device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=gen).to(device)
        for start in range(0, x_train.shape[0], batch_size):
            sel = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(predictor(x_train[sel]), y_train[sel]).backward()
            opt.step()
    with torch.no_grad():
        logits = predictor(x_val)
        report = PredictorReport(k=k, recall=recall_at_k(logits, y_val, k), loss=loss_fn(logits, y_val).item(),
                                 positive_fraction=pos, train_rows=x_train.shape[0], val_rows=n_val)
    return predictor, report


# --- modules


def _activation_name(module: nn.Module) -> str:
    """effx activation name of an activation module (torch's or Hugging Face's classes)."""
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    name = type(module).__name__
    known = {"SiLUActivation": "silu", "GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh",
             "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
             "ReLUActivation": "relu"}
    if name in known:
        return known[name]
    raise ValueError(f"effx.sparse.SparseMLP: cannot tell the activation of {name}; pass activation=")


class SparseMLP(nn.Module):
    """A dense MLP computed over a predicted subset of its neurons.

    Holds the MLP's weights (down projection transposed) and a :class:`SparsePredictor`; each
    call keeps ``round(density * n)`` neurons. ``density=1.0`` computes every neuron (no
    predictor needed) and equals the dense MLP. Look-ahead: :meth:`plan` takes an earlier
    activation (e.g. the previous layer's block input, with a predictor trained on that pairing)
    and fixes the neurons of the next call.
    """

    def __init__(
        self,
        w_up: torch.Tensor,
        w_down_t: torch.Tensor,
        *,
        activation: str = "relu",
        w_gate: torch.Tensor | None = None,
        b_up: torch.Tensor | None = None,
        b_down: torch.Tensor | None = None,
        predictor: SparsePredictor | None = None,
        density: float = 1.0,
        per_row: bool = False,
    ):
        super().__init__()
        self.activation = _kernel_activation(activation, w_gate)
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"effx.sparse.SparseMLP: activation must be one of {', '.join(_ACTIVATIONS)}, "
                             f"swiglu, got '{activation}'")
        self.w_up = nn.Parameter(w_up.detach().contiguous(), requires_grad=False)
        self.w_down_t = nn.Parameter(w_down_t.detach().contiguous(), requires_grad=False)
        self.w_gate = None if w_gate is None else nn.Parameter(w_gate.detach().contiguous(), requires_grad=False)
        self.b_up = None if b_up is None else nn.Parameter(b_up.detach(), requires_grad=False)
        self.b_down = None if b_down is None else nn.Parameter(b_down.detach(), requires_grad=False)
        self.predictor = predictor
        self.per_row = per_row
        self.density = density
        self._planned: torch.Tensor | None = None

    @property
    def num_neurons(self) -> int:
        return self.w_up.shape[0]

    @property
    def density(self) -> float:
        return self._density

    @density.setter
    def density(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"effx.sparse.SparseMLP: density must be in [0, 1], got {value}")
        if value < 1.0 and self.predictor is None:
            raise ValueError("effx.sparse.SparseMLP: density below 1 needs a predictor")
        self._density = value

    @property
    def k(self) -> int:
        """Neurons computed per call."""
        return int(round(self._density * self.num_neurons))

    @classmethod
    def from_dense(cls, mlp: nn.Module, *, activation: str | None = None, **kwargs) -> "SparseMLP":
        """Wrap a dense MLP: Llama-style (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``),
        GPT-style (``fc1``, ``act``/``activation_fn``, ``fc2``) or ``nn.Sequential(Linear, act,
        Linear)``. Weights are copied (the down projection transposed)."""
        if all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            act = activation or _activation_name(mlp.act_fn)
            gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            return cls(up.weight, down.weight.t(), activation=act, w_gate=gate.weight, b_up=up.bias,
                       b_down=down.bias, **kwargs)
        if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
            act_module = next((getattr(mlp, a) for a in ("act", "activation_fn", "act_fn") if hasattr(mlp, a)), None)
            act = activation or _activation_name(act_module)
            return cls(mlp.fc1.weight, mlp.fc2.weight.t(), activation=act, b_up=mlp.fc1.bias,
                       b_down=mlp.fc2.bias, **kwargs)
        if isinstance(mlp, nn.Sequential) and len(mlp) == 3:
            fc1, act_module, fc2 = mlp
            act = activation or _activation_name(act_module)
            return cls(fc1.weight, fc2.weight.t(), activation=act, b_up=fc1.bias, b_down=fc2.bias, **kwargs)
        raise ValueError(f"effx.sparse.SparseMLP.from_dense: unknown MLP layout {type(mlp).__name__}; "
                         "expected gate_proj/up_proj/down_proj, fc1/fc2 or Sequential(Linear, act, Linear)")

    @torch.no_grad()
    def plan(self, x_earlier: torch.Tensor) -> torch.Tensor:
        """Look-ahead: choose the neurons of the next call from an earlier activation."""
        self._planned = self._select(x_earlier)
        return self._planned

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        if self.predictor is None or self.k == self.num_neurons:
            if self.per_row:
                return torch.arange(self.num_neurons, device=x.device).expand(x.reshape(-1, x.shape[-1]).shape[0], -1)
            return torch.arange(self.num_neurons, device=x.device)
        return self.predictor.select(x.reshape(-1, x.shape[-1]) if self.per_row else x, self.k, per_row=self.per_row)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., d]`` -> ``[..., d]``. ``idx`` overrides the prediction (and any plan)."""
        if idx is None:
            idx, self._planned = (self._planned, None) if self._planned is not None else (self._select(x), None)
            check = False  # top-k / arange indices are valid by construction
        else:
            check = True
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = ops.sparse_mlp(x2, self.w_up, self.w_down_t, idx, self.activation, self.w_gate, self.b_up,
                           self.b_down, None, check)
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return (f"d={self.w_up.shape[1]}, n={self.num_neurons}, activation={self.activation}, "
                f"gated={self.w_gate is not None}, density={self._density}, per_row={self.per_row}")
