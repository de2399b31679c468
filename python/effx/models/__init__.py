"""effx.models: the model runner. A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2)
whose attention runs through the effx KV caches, Hugging Face checkpoint loading, batched
generation and teacher-forced scoring.

    model = effx.models.from_pretrained("path/to/Llama-3.2-1B", dtype="bfloat16", device="cuda")
    ids = [model.tokenizer.encode(p) for p in ["Hello", "The capital of France is"]]
    result = effx.models.generate(model, ids, max_new_tokens=64, cache="kivi2",
                                  stop_tokens=model.config.eos_token_ids)
    texts = [model.tokenizer.decode(t) for t in result.tokens]
"""

from effx.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from effx.models.generate import (CACHE_POLICIES, GenerationResult, generate,
                                  make_cache, teacher_forced_logits)
from effx.models.llama import CausalLM, LayerWeights
from effx.models.loading import ByteTokenizer, HFTokenizer, from_pretrained, load_tokenizer, random_model
from effx.models.methods import SparseMLPs, StreamedWeights, early_exit_draft, sparse_mlps
from effx.models.speculation import TreeCosts, measure_tree_costs, plan_tree

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "CausalLM", "LayerWeights", "from_pretrained", "random_model",
           "load_tokenizer", "HFTokenizer", "ByteTokenizer", "generate", "GenerationResult", "make_cache",
           "teacher_forced_logits", "CACHE_POLICIES", "sparse_mlps", "SparseMLPs",
           "StreamedWeights", "early_exit_draft", "plan_tree",
           "measure_tree_costs", "TreeCosts"]
