"""Model runner: the configuration of a Llama-family decoder, read from a Hugging Face
config.json (Llama 2/3, Mistral, Qwen2).

Both spellings of RoPE settings found in the wild are read: ``rope_theta`` + ``rope_scaling``
(``type`` or ``rope_type``) and the newer ``rope_parameters`` dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES"]

# architecture name in config.json -> the family's conventions that differ.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _fail(message: str) -> None:
    raise ValueError(f"effx.models: config.json: {message}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What the decoder needs; :meth:`from_dict` reads it from a config.json dict."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"rope_type": "linear" | "dynamic" | "llama3" | "yarn", ...} or None for plain RoPE.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Tokens a query may see when the checkpoint was trained with sliding-window attention.
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: torch.dtype | None = None

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        if not isinstance(archs, list) or not archs:
            _fail("'architectures' is missing; effx.models needs one of " + ", ".join(SUPPORTED_ARCHITECTURES))
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"effx.models: unsupported architecture {arch!r}; effx.models runs "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str, kind=int) -> Any:
            if key not in d:
                _fail(f"{key!r} is missing")
            value = d[key]
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
                _fail(f"{key!r} must be a positive {kind.__name__}, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            _fail(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        head_dim = d.get("head_dim") or hidden // heads
        if head_dim % 2:
            _fail(f"head_dim must be even for RoPE, got {head_dim}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            _fail(f"hidden_act must be 'silu' (SwiGLU), got {act!r}")
        theta, scaling = _rope(d)
        if family == "mistral":
            window = d.get("sliding_window")
        elif family == "qwen2" and d.get("use_sliding_window"):
            window = d.get("sliding_window")
        else:
            window = None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        dtype_name = d.get("torch_dtype") or d.get("dtype")
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            architecture=arch, vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"), num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama's attention_bias covers o_proj too.
            qkv_bias=family == "qwen2" or attention_bias, o_bias=family == "llama" and attention_bias,
            mlp_bias=family == "llama" and bool(d.get("mlp_bias", False)),
            sliding_window=window, eos_token_ids=eos_ids, bos_token_id=d.get("bos_token_id"),
            torch_dtype=_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None,
        )


def _rope(d: dict[str, Any]) -> tuple[float, dict | None]:
    params = d.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else {}
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        _fail("partial_rotary_factor is not supported (RoPE over the whole head)")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_TYPES:
        _fail(f"rope type {kind!r} is not supported; effx.models supports {', '.join(_ROPE_TYPES)}")
    if kind == "default":
        return float(theta), None
    if kind == "yarn":
        scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
        if scaling.get("factor") is None and scaling["original_max_position_embeddings"]:
            # DeepSeek-V3's spelling: the factor is the ratio of the two context lengths.
            scaling["factor"] = d["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    if "factor" not in scaling:
        _fail(f"rope scaling {kind!r} needs 'factor'")
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in scaling:
                _fail(f"rope scaling 'llama3' needs {key!r}")
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = kind
    return float(theta), out
