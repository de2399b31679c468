"""Model runner: loading Hugging Face checkpoint folders (config.json, *.safetensors sharded
or not, tokenizer.json) and the seeded random demo model.

Weights are read with the safetensors library tensor by tensor straight into a model built on
the meta device, so a checkpoint is never held twice in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from effx.models.config import ModelConfig
from effx.models.llama import CausalLM

__all__ = ["from_pretrained", "random_model", "load_tokenizer", "ByteTokenizer", "HFTokenizer"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _fail(message: str) -> None:
    raise ValueError(f"effx.models.from_pretrained: {message}")


def _dtype(dtype, config: ModelConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return config.torch_dtype or torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            _fail(f"dtype must be one of auto, {', '.join(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        _fail(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


class HFTokenizer:
    """tokenizer.json through the tokenizers library: ``encode(text) -> ids`` (with the special
    tokens its post-processor adds, e.g. BOS), ``decode(ids) -> text``."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception on bad files
            raise ValueError(f"effx.models.load_tokenizer: cannot read {path}: {err}") from err

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class ByteTokenizer:
    """The random model's tokenizer: one token per UTF-8 byte (ids 0-255), BOS 256, EOS 257."""

    bos, eos = 256, 257

    def encode(self, text: str) -> list[int]:
        return [self.bos, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer.json of a checkpoint folder (or the file itself)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"effx.models.load_tokenizer: no tokenizer.json at {file}")
    return HFTokenizer(file)


def _expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = CausalLM(c)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the *.safetensors files."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            _fail(f"{index} is not a safetensors index (a JSON object with 'weight_map'): {err}")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            _fail(f"{index.name} names shard(s) that are not in {path}: {', '.join(missing)}")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
        hint = f" (found {', '.join(others)}: only safetensors checkpoints are read)" if others else ""
        _fail(f"no *.safetensors weights in {path}{hint}")
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for file in files:
        with _open(safe_open, file) as f:
            names.update({name: file for name in f.keys()})
    return names


def _open(safe_open, file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # SafetensorError and OSError both mean an unreadable file
        _fail(f"cannot read {file}: {err} (truncated or not a safetensors file?)")


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu") -> CausalLM:
    """Load a Hugging Face checkpoint folder (Llama 2/3, Mistral, Qwen2) into :class:`CausalLM`.

    ``path`` holds config.json and the weights as *.safetensors (one file, or shards listed by
    model.safetensors.index.json); tokenizer.json, when present, becomes ``model.tokenizer``
    and generation_config.json's ``eos_token_id`` joins the config's stop tokens. ``dtype``:
    float32/float16/bfloat16 or "auto"/None for the checkpoint's own (float32 if it names none).
    """
    path = Path(path)
    if not path.is_dir():
        _fail(f"{path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        _fail(f"no config.json in {path}")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        _fail(f"{config_file} is not valid JSON: {err}")
    config = ModelConfig.from_dict(raw)
    generation = path / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        config = ModelConfig(**{**config.__dict__,
                                "eos_token_ids": tuple(dict.fromkeys([*config.eos_token_ids, *extra]))})
    dtype = _dtype(dtype, config)
    device = torch.device(device)

    expected = _expected_shapes(config)
    files = _weight_files(path)
    names = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        names.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing:
        _fail(f"the checkpoint lacks {len(missing)} tensor(s) that {config.architecture} with this config needs: "
              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        _fail(f"the checkpoint has {len(unexpected)} tensor(s) that {config.architecture} with this config does "
              f"not use: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")

    from safetensors import safe_open

    state = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, tensor_names in by_file.items():
        with _open(safe_open, file) as f:
            for name in tensor_names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    _fail(f"tensor {name} in {file.name} has shape {list(shape)}, but config.json implies "
                          f"{list(expected[name])}")
                try:
                    tensor = f.get_tensor(name)
                except Exception as err:
                    _fail(f"cannot read tensor {name} from {file}: {err} (truncated file?)")
                state[name] = tensor.to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = CausalLM(config)
    model.load_state_dict(state, assign=True, strict=True)
    model.name = path.name
    if (path / "tokenizer.json").is_file():
        model.tokenizer = load_tokenizer(path)
    return model.eval()


def random_model(*, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 num_layers: int = 4, hidden_size: int = 512, num_heads: int = 8, num_kv_heads: int = 2,
                 intermediate_size: int = 1536) -> CausalLM:
    """A small Llama-architecture model with RANDOM weights (seeded) and a byte tokenizer, for
    demos and tests: its outputs are meaningless text, its costs and cache behaviour are real.

    Weights are drawn N(0, 1/fan_in) so activations keep unit scale through the layers and the
    next-token distributions are far from uniform (fidelity numbers then mean something).
    """
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=8192, eos_token_ids=(ByteTokenizer.eos,),
                         bos_token_id=ByteTokenizer.bos)
    with torch.device("meta"):
        model = CausalLM(config)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape)
        elif name == "model.embed_tokens.weight":
            state[name] = torch.randn(p.shape, generator=g)
        else:
            state[name] = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True, strict=True)
    model.tokenizer = ByteTokenizer()
    model.name = f"random Llama ({num_layers} layers, hidden {hidden_size}, seed {seed}; RANDOM weights)"
    return model.eval()
