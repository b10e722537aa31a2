"""The packed layout of one layer: every parameter and buffer at a fixed offset in one flat buffer.

One flat host buffer per layer means one pinned allocation at setup and one copy per transfer;
the device side uses the same offsets, so a device slot can hold any layer.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
from torch import nn

# Offsets are aligned so every tensor view starts where vectorised kernels expect it.
ALIGN_BYTES = 256


@dataclasses.dataclass(frozen=True)
class PackedTensor:
    """Where one tensor of a layer sits in the layer's flat buffer."""

    name: str
    tensor: torch.Tensor  # the model's own Parameter or buffer object; its .data is swapped
    offset: int
    span_bytes: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def view_in(self, flat: torch.Tensor) -> torch.Tensor:
        """This tensor as a view into `flat` (a uint8 buffer laid out like the layer)."""
        raw = flat[self.offset : self.offset + self.span_bytes].view(self.dtype)
        return raw.as_strided(self.shape, self.stride)


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """Every tensor of one layer that moves, with its offset; `nbytes` is the flat buffer size."""

    tensors: tuple[PackedTensor, ...]
    nbytes: int


def layer_tensors(layer: nn.Module, shared: set[int]) -> list[tuple[str, torch.Tensor]]:
    """The parameters and buffers of a layer that move, each once, skipping `shared` ones.

    Tensors whose id is in `shared` are used outside this layer too (tied weights); they stay
    resident so the other user never sees a released tensor.
    """
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        if id(tensor) in seen or id(tensor) in shared:
            continue
        seen.add(id(tensor))
        found.append((name, tensor))
    return found


def plan_layout(named: list[tuple[str, torch.Tensor]]) -> LayerLayout:
    """Lay the tensors out back to back at aligned offsets, keeping each one's strides."""
    packed = []
    offset = 0
    for name, tensor in named:
        span_bytes = _span_elements(tensor) * tensor.element_size()
        packed.append(
            PackedTensor(
                name=name,
                tensor=tensor,
                offset=offset,
                span_bytes=span_bytes,
                shape=tuple(tensor.shape),
                stride=tuple(tensor.stride()),
                dtype=tensor.dtype,
            )
        )
        offset += -(-span_bytes // ALIGN_BYTES) * ALIGN_BYTES
    return LayerLayout(tensors=tuple(packed), nbytes=offset)


def pack_into(layout: LayerLayout, flat: torch.Tensor) -> list[torch.Tensor]:
    """Copy each tensor's current values into `flat`; return the views, in layout order."""
    views = []
    for item in layout.tensors:
        view = item.view_in(flat)
        view.copy_(item.tensor.data)
        views.append(view)
    return views


def _span_elements(tensor: torch.Tensor) -> int:
    """Elements between the first and last addressed element (the numel for contiguous tensors)."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def tensors_shared_outside(model: nn.Module, layers: dict[int, nn.Module]) -> dict[int, set[int]]:
    """For each layer index: ids of that layer's tensors also owned by a module outside the layer.

    Such a tensor (a tied embedding, say) is not packed: it stays resident, so its other owner
    never sees a released tensor. The offloader and the planner apply the same rule."""
    owners: dict[int, set[int]] = collections.defaultdict(set)
    for module in model.modules():
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None:
                owners[id(tensor)].add(id(module))
    shared = {}
    for index, layer in layers.items():
        inside = {id(m) for m in layer.modules()}
        own = {id(t) for t in [*layer.parameters(), *layer.buffers()]}
        shared[index] = {tid for tid in own if owners[tid] - inside}
    return shared
