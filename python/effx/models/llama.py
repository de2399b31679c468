"""Model runner: a compact Llama-family decoder (Llama 2/3, Mistral, Qwen2) whose attention
runs through an effx KV cache (SPECS.md section 8).

Layout: hidden states [B, T, hidden]; attention tensors [B, heads, T, head_dim]. Parameter
names are those of Hugging Face checkpoints (``model.layers.{j}.self_attn.q_proj.weight``...),
so a checkpoint's state dict loads as is. The model applies RoPE with per-row position ids
(each row continues from what the cache holds for it, so ragged batches work) and hands the
rotated K/V to ``cache.attend``, which stores them and does the attention.

Hooks for the other effx methods, all on :meth:`CausalLM.forward`:
- ``mlp``: one module per layer replacing that layer's MLP, called as ``mlp(x)`` on the
  post-attention-norm hidden states [B, T, hidden] (a sparse MLP with its predictor);
- ``weights``: a provider with ``layer(j)`` returning the parameters of decoder layer ``j`` by
  their names inside the layer (``self_attn.q_proj.weight``, ``mlp.down_proj.weight``, ...),
  asked for in layer order (an offload engine serving weights with prefetch);
- ``parents`` and ``positions``: a token tree, passed to the cache (tree speculative decoding).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from effx import kv
from effx.models.config import ModelConfig

__all__ = ["CausalLM", "LayerWeights", "RMSNorm", "Rotary"]


class LayerWeights(Protocol):
    """What ``weights=`` takes: the parameters of decoder layer ``j`` by name within the layer."""

    def layer(self, j: int) -> Mapping[str, torch.Tensor]: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalized in fp32, scaled in the model dtype (as the reference implementations do).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary:
    """RoPE frequencies for the config's scaling (none, linear, dynamic NTK, llama3, YaRN)."""

    def __init__(self, config: ModelConfig):
        d = config.head_dim
        self.config = config
        self.exponents = torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d
        inv_freq = config.rope_theta ** -self.exponents
        scaling = config.rope_scaling or {}
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "llama3":
            inv_freq = _llama3_frequencies(inv_freq, scaling)
        self.attention_factor = 1.0
        if kind == "yarn":
            inv_freq, self.attention_factor = _yarn_frequencies(config.rope_theta, d, scaling)
        self.kind = kind
        self.inv_freq = inv_freq.float()
        self._cached: dict[torch.device, torch.Tensor] = {}

    def _frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        if self.kind == "dynamic":
            # NTK-aware: the base grows with the longest sequence in the call once it passes the
            # trained length (decode steps only ever grow it, so cached keys stay consistent).
            n = int(positions.max()) + 1
            limit, factor = self.config.max_position_embeddings, self.config.rope_scaling["factor"]
            if n > limit:
                d = self.config.head_dim
                base = self.config.rope_theta * ((factor * n / limit) - (factor - 1)) ** (d / (d - 2))
                return (base ** -self.exponents).float().to(positions.device)
        dev = positions.device
        if dev not in self._cached:
            self._cached[dev] = self.inv_freq.to(dev)
        return self._cached[dev]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, head_dim] (fp32) for positions [B, T]."""
        freqs = positions.float()[..., None] * self._frequencies(positions)
        emb = torch.cat((freqs, freqs), -1)[:, None]
        if self.attention_factor != 1.0:  # YaRN's temperature, on both q and k
            return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return emb.cos(), emb.sin()


def _llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth blend between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def _yarn_frequencies(theta: float, d: int, s: dict) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023): per frequency, a ramp between extrapolation (high frequencies,
    # kept) and interpolation (low frequencies, divided by factor) over the dimensions whose
    # wavelength falls between beta_fast and beta_slow rotations of the original context; cos
    # and sin scaled by 0.1 ln(factor) + 1 (or the mscale ratio, or attention_factor).
    factor, old = float(s["factor"]), float(s["original_max_position_embeddings"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over `old` tokens
        return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = theta ** -(torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)
    keep = 1 - ramp
    return extrapolation / factor * (1 - keep) + extrapolation * keep, float(attention)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, -1)
    return (x.float() * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.window = c.sliding_window
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)

    def forward(self, x, layer, cos, sin, cache, lengths, parents):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = cache.attend(layer, _rotate(q, cos, sin), _rotate(k, cos, sin), v, parents=parents, lengths=lengths,
                           window=self.window)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, layer, cos, sin, cache, lengths, parents, mlp):
        h = x + self.self_attn(self.input_layernorm(x), layer, cos, sin, cache, lengths, parents)
        return h + (self.mlp if mlp is None else mlp)(self.post_attention_layernorm(h))


class _Body(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


def _fail(message: str) -> None:
    raise ValueError(f"effx.models.CausalLM: {message}")


class CausalLM(nn.Module):
    """A Llama-family decoder. ``model(input_ids)`` -> logits [B, T, vocab] (fp32).

    Built with random initial values; :func:`effx.models.from_pretrained` loads a checkpoint
    and :func:`effx.models.random_model` gives the seeded demo model. ``tokenizer`` is set by
    the loaders (None when there is none).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.rotary = Rotary(config)
        self.tokenizer = None
        self.name = config.architecture

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch_size: int, capacity: int) -> kv.DenseCache:
        return kv.DenseCache(self.config.num_layers, batch_size, self.config.num_kv_heads, self.config.head_dim,
                             capacity, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, *, cache: kv.KVCache | None = None,
                positions: torch.Tensor | None = None, lengths: torch.Tensor | Sequence[int] | None = None,
                parents: torch.Tensor | Sequence[int] | None = None, logits_at: torch.Tensor | None = None,
                mlp: Sequence[Callable[[torch.Tensor], torch.Tensor] | None] | None = None,
                weights: LayerWeights | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] in fp32 for ``input_ids`` [B, T].

        cache: where K/V go and attention happens; None attends over the call's tokens only (a
            fresh :class:`effx.kv.DenseCache` of T tokens). The call appends to the cache.
        positions: [B, T] RoPE positions; default: each row continues from its cached length.
        lengths: [B] valid tokens per row (right padding; padded positions give garbage logits).
        parents: a token tree for the cache (``KVCache.attend``); give tree-depth ``positions``.
        logits_at: [B, K] token indices whose logits to compute (-> [B, K, vocab]), so a prefill
            does not project every prompt token onto the vocabulary.
        mlp: per layer, a module replacing the layer's MLP (None entries keep the dense one).
        weights: a :class:`LayerWeights` provider serving each decoder layer's parameters.
        """
        c = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32) or input_ids.shape[1] < 1:
            _fail(f"input_ids must be an int tensor [batch, tokens >= 1], got {input_ids.dtype} "
                  f"{list(input_ids.shape)}")
        b, t = input_ids.shape
        if cache is None:
            cache = self.new_cache(b, t)
        elif cache.num_layers != c.num_layers or cache.num_kv_heads != c.num_kv_heads or cache.head_dim != c.head_dim:
            _fail(f"the cache holds {cache.num_layers} layers x {cache.num_kv_heads} kv-heads x head_dim "
                  f"{cache.head_dim}; this model needs {c.num_layers} x {c.num_kv_heads} x {c.head_dim}")
        if mlp is not None and len(mlp) != c.num_layers:
            _fail(f"mlp must hold one module (or None) per layer ({c.num_layers}), got {len(mlp)}")
        input_ids = input_ids.to(self.device)
        if positions is None:
            positions = cache.lengths(0)[:, None] + torch.arange(t)
        positions = torch.as_tensor(positions).to(self.device)
        if positions.shape != (b, t):
            _fail(f"positions must have shape [{b}, {t}], got {list(positions.shape)}")
        cos, sin = self.rotary.cos_sin(positions)
        h = self.model.embed_tokens(input_ids)
        for j, layer in enumerate(self.model.layers):
            args = (h, j, cos, sin, cache, lengths, parents, None if mlp is None else mlp[j])
            if weights is None:
                h = layer(*args)
            else:
                h = torch.func.functional_call(layer, dict(weights.layer(j)), args, strict=True)
        if logits_at is not None:
            index = torch.as_tensor(logits_at).to(self.device)
            h = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))
        h = self.model.norm(h)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(h, head).float()
