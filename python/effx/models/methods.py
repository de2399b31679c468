"""The model runner's plug-ins for effx methods that are not a KV cache: a DejaVu sparse MLP
for every layer (predictors trained on the model's own activations) and weights streamed
through the FlexGen-style offload engine. Both plug into :func:`effx.models.generate` and
:meth:`CausalLM.forward` through their ``mlp=`` and ``weights=`` arguments."""

from __future__ import annotations

import dataclasses

import torch

from effx import offload, sparse
from effx.models.llama import CausalLM

__all__ = ["SparseMLPs", "sparse_mlps", "StreamedWeights", "early_exit_draft"]


def early_exit_draft(model: CausalLM, num_layers: int) -> CausalLM:
    """A draft for tree speculation that shares the model's embeddings, first ``num_layers``
    decoder layers, final norm and head (no extra weights; cheap and often agreeing)."""
    if not 1 <= num_layers <= model.config.num_layers:
        raise ValueError(f"effx.models.early_exit_draft: num_layers must be in [1, {model.config.num_layers}], "
                         f"got {num_layers}")
    draft = CausalLM(dataclasses.replace(model.config, num_layers=0))
    draft.model.embed_tokens = model.model.embed_tokens
    draft.model.layers = torch.nn.ModuleList(model.model.layers[:num_layers])
    draft.model.norm = model.model.norm
    draft.lm_head = model.lm_head
    draft.config = dataclasses.replace(model.config, num_layers=num_layers)
    draft.rotary = model.rotary
    draft.name = f"{model.name} (first {num_layers} layers)"
    return draft


@dataclasses.dataclass
class SparseMLPs:
    """One :class:`effx.sparse.SparseMLP` per layer (pass ``modules`` as ``mlp=``) and the
    predictors' recall at their k on held-out calibration tokens."""

    modules: list[sparse.SparseMLP]
    recall: list[float]


def sparse_mlps(model: CausalLM, calibration: list[list[int]], density: float, *, rank: int = 256,
                epochs: int = 20) -> SparseMLPs:
    """Train a low-rank predictor per layer on the ``calibration`` prompts (labels: the top
    ``density`` fraction of neurons by |activation|, SwiGLU models having no exact zeros) and
    wrap each layer's MLP in a :class:`effx.sparse.SparseMLP` that reads only the predicted
    neurons' rows of its weights."""
    if not 0 < density <= 1:
        raise ValueError(f"effx.models.sparse_mlps: density must be in (0, 1], got {density}")
    layers = model.model.layers
    points = {str(j): (layer.mlp, layer.mlp.down_proj) for j, layer in enumerate(layers)}
    batches = [(torch.tensor([p], device=model.device),) for p in calibration]
    recorded = sparse.record_activations(model, batches, points)
    modules, recall = [], []
    for j, layer in enumerate(layers):
        inputs, hidden = recorded[str(j)]
        k = max(1, round(density * hidden.shape[1]))
        labels = sparse.activation_labels(hidden, rule="topk", k=k)
        predictor, report = sparse.train_predictor(inputs, labels, k, rank=rank, epochs=epochs)
        predictor = predictor.to(device=model.device, dtype=model.dtype)
        # The runner's MLP is SwiGLU: silu(gate) * up.
        modules.append(sparse.SparseMLP.from_dense(layer.mlp, activation="silu", predictor=predictor, density=density))
        recall.append(report.recall)
    return SparseMLPs(modules, recall)


class StreamedWeights:
    """The decoder layers' weights served by an :class:`effx.offload.OffloadEngine` under
    ``policy`` (e.g. half on the host, half on disk), prefetching layer j + 1 while layer j
    computes. Pass it as ``weights=``; close it (or use ``with``) to free the tiers."""

    def __init__(self, model: CausalLM, policy: offload.Policy, *, disk_dir: str | None = None):
        layers = [{name: p.detach() for name, p in layer.named_parameters()} for layer in model.model.layers]
        self.engine = offload.OffloadEngine(layers, policy, device=model.device, disk_dir=disk_dir)
        self.streamed_bytes = sum(t.nbytes for layer in layers for t in layer.values())

    def layer(self, j: int) -> dict[str, torch.Tensor]:
        return self.engine.load_layer(j)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "StreamedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
