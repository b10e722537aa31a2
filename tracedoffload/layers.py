"""Finding the decoder layer list of a transformers model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from tracedoffload._exceptions import LayerDiscoveryError

# Attribute paths where transformers models keep their decoder blocks, most common first.
LAYER_LIST_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Phi-3
    "model.language_model.layers",  # multimodal wrappers
    "language_model.model.layers",
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "transformer.blocks",  # MPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.transformer.h",
    "decoder.layers",
    "layers",
    "h",
)


def find_decoder_layers(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """Return the attribute path and the layers of the model's decoder layer list.

    Raises:
        LayerDiscoveryError: none of `LAYER_LIST_PATHS` leads to a non-empty `nn.ModuleList`.
    """
    for path in LAYER_LIST_PATHS:
        candidate = _walk(model, path)
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return path, list(candidate)
    raise LayerDiscoveryError(
        f"{type(model).__name__} has no decoder layer list: looked for a non-empty nn.ModuleList at "
        f"{', '.join(LAYER_LIST_PATHS)}. Pass the layers explicitly: offload(model, config, layers=[...])"
    )


def check_layer_list(model: nn.Module, layers: Sequence[nn.Module]) -> list[nn.Module]:
    """Validate an explicit layer list: non-empty, distinct modules, all inside the model."""
    layers = list(layers)
    if not layers:
        raise LayerDiscoveryError("layers is empty: pass at least one nn.Module of the model")
    inside = {id(m) for m in model.modules()}
    seen: set[int] = set()
    for index, layer in enumerate(layers):
        if not isinstance(layer, nn.Module):
            raise LayerDiscoveryError(f"layers[{index}] is a {type(layer).__name__}, not an nn.Module")
        if id(layer) not in inside:
            raise LayerDiscoveryError(f"layers[{index}] ({type(layer).__name__}) is not a submodule of the model")
        if id(layer) in seen:
            raise LayerDiscoveryError(f"layers[{index}] appears twice in the layer list; each layer is offloaded once")
        seen.add(id(layer))
    for index, layer in enumerate(layers):
        nested = {id(m) for m in layer.modules()} - {id(layer)}
        if nested & seen:
            raise LayerDiscoveryError(f"layers[{index}] contains another listed layer; layers must not nest")
    return layers


def _walk(root: nn.Module, path: str) -> object:
    node: object = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node
