"""LayerPlan: which tensors make the embeddings, each decoder layer, the final norm and the head.

Grouping is done on the index (all keys at once) before any data is read, so a layer whose tensors
sit in non-consecutive shards is still one complete group; every layer index 0..N-1 must be there.
The decoder-layer prefix is inferred as the most common `<prefix>.<int>.` in the keys unless given.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import IncompleteLayerError, LayerLayoutError
from .index import CheckpointIndex

# First `.<int>.` in a key: `model.layers.3.mlp.experts.7.w1` -> prefix `model.layers`, layer 3.
_NUMBERED = re.compile(r"^(.+?)\.(\d+)\.")

#: Module names of token/position embeddings across the common families (llama, gpt2, neox,
#: chatglm, bloom, falcon, opt, ...). Matched as whole dotted segments.
EMBEDDING_MODULES = frozenset(
    {
        "embed_tokens",
        "wte",
        "wpe",
        "word_embeddings",
        "embed_in",
        "tok_embeddings",
        "embed_positions",
        "position_embeddings",
        "word_embeddings_layernorm",
    }
)
#: Final-norm module names; matched only directly under the parent of the layer prefix
#: (`model.norm` for `model.layers`), so a vision tower's norms are not taken for it.
FINAL_NORM_MODULES = frozenset(
    {"norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f", "layer_norm"}
)
#: Output projection names (tied checkpoints have none).
HEAD_MODULES = frozenset({"lm_head", "embed_out", "output_layer"})


def infer_layer_prefix(names: Iterable[str]) -> str:
    """The most common `<prefix>` of `<prefix>.<int>.` keys, counted per tensor."""
    counts = Counter(m.group(1) for m in map(_NUMBERED.match, names) if m)
    if not counts:
        raise LayerLayoutError(
            "no tensor name has the `<prefix>.<int>.` form of decoder layers (like "
            "model.layers.0.…); pass layer_prefix= explicitly if the layout is unusual."
        )
    return counts.most_common(1)[0][0]


@dataclass
class LayerPlan:
    """Tensor names per part of the model, in checkpoint order within each part."""

    index: CheckpointIndex
    layer_prefix: str
    layers: list[list[str]]
    embeddings: list[str] = field(default_factory=list)
    norm: list[str] = field(default_factory=list)
    lm_head: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def tied(self) -> bool:
        """True when the checkpoint has no lm_head tensor (the head reuses the embeddings)."""
        return not self.lm_head

    def nbytes(self, names: Iterable[str]) -> int:
        return sum(self.index.tensors[n].nbytes for n in names)

    @property
    def layer_nbytes(self) -> list[int]:
        return [self.nbytes(layer) for layer in self.layers]

    def groups(self) -> list[tuple[str, int | None, list[str]]]:
        """(part, layer index or None, names) in model order; empty parts left out.

        Parts: "embeddings", "layer", "norm", "lm_head", "other".
        """
        out: list[tuple[str, int | None, list[str]]] = []
        if self.embeddings:
            out.append(("embeddings", None, self.embeddings))
        out.extend(("layer", i, names) for i, names in enumerate(self.layers))
        for part in ("norm", "lm_head", "other"):
            names = getattr(self, part)
            if names:
                out.append((part, None, names))
        return out

    @classmethod
    def from_index(cls, index: CheckpointIndex, layer_prefix: str | None = None) -> LayerPlan:
        names = list(index.tensors)
        prefix = (layer_prefix or infer_layer_prefix(names)).rstrip(".")
        numbered = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        by_layer: dict[int, list[str]] = {}
        rest: list[str] = []
        for name in names:
            match = numbered.match(name)
            if match:
                by_layer.setdefault(int(match.group(1)), []).append(name)
            else:
                rest.append(name)
        where = index.source.location
        if not by_layer:
            inferred = infer_layer_prefix(names) if layer_prefix else prefix
            raise LayerLayoutError(
                f"{where}: no tensor starts with layer prefix {prefix!r}.<int>.; check "
                f"layer_prefix (inferred: {inferred!r})."
            )
        count = max(by_layer) + 1
        missing = [i for i in range(count) if i not in by_layer]
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise IncompleteLayerError(
                f"{where}: decoder layers {shown} of {prefix}.0..{count - 1} have no tensors; the "
                "checkpoint is incomplete (a shard missing from the index?): re-download it."
            )

        parent = prefix.rpartition(".")[0]
        plan = cls(index=index, layer_prefix=prefix, layers=[by_layer[i] for i in range(count)])
        for name in rest:
            module = name.rpartition(".")[0]  # drop `.weight` / `.bias`
            segments = module.split(".")
            if segments[0] == "lm_head" or segments[-1] in HEAD_MODULES or module == "output":
                plan.lm_head.append(name)
            elif EMBEDDING_MODULES.intersection(segments):
                plan.embeddings.append(name)
            elif module.rpartition(".")[0] == parent and segments[-1] in FINAL_NORM_MODULES:
                plan.norm.append(name)
            else:
                plan.other.append(name)
        return plan
