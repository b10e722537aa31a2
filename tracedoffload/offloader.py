"""Layer-wise offloading: some decoder layers resident on the compute device, the rest streamed in.

Per forward pass, each offloaded layer is copied from its host buffer (pinned once at setup) into
one of a fixed pool of device slots, ahead of need on a side stream, and released after its
forward by pointing its tensors back at the host buffer: nothing is ever copied back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tracedoffload._exceptions import DeviceUnavailableError, HookConflictError, TracedOffloadError
from tracedoffload._packing import LayerLayout, layer_tensors, pack_into, plan_layout, tensors_shared_outside
from tracedoffload._streams import CpuStreams, CudaStreams, SlotFences, streams_for
from tracedoffload.config import ConfigError, OffloadConfig, parse_device, resident_layer_indices
from tracedoffload.layers import check_layer_list, find_decoder_layers
from tracedoffload.logs import get_logger
from tracedoffload.presets import GPU_TIERS
from tracedoffload.timeline import COMPUTE, RELEASE, TRANSFER, LayerRecord, NullTimeline, Timeline

log = get_logger("tracedoffload.offloader")

# Set on the model and on each hooked layer while offloaded; a second offload() finds it.
HOOK_ATTR = "_tracedoffload_hook"
# Other libraries' offload hooks: two offloaders on one module would fight over its weights.
FOREIGN_HOOK_ATTRS = {
    "_hf_hook": "accelerate (remove it with accelerate.hooks.remove_hook_from_module(model, recurse=True))",
    "_diffusers_hook": "diffusers (remove its hooks before offloading with tracedoffload)",
}


@dataclasses.dataclass
class _OffloadedLayer:
    index: int
    layout: LayerLayout
    host_flat: torch.Tensor
    host_views: list[torch.Tensor]
    slot_views: list[list[torch.Tensor]]  # per device slot, the layer's tensors as views into it
    original_devices: list[torch.device]  # where each tensor lived before offload(), for detach()


@dataclasses.dataclass
class _Slot:
    index: int
    flat: torch.Tensor
    fences: SlotFences
    layer: int | None = None  # the layer copied (or being copied) into this slot
    in_use: bool = False  # its layer's forward is running


def offload(
    model: nn.Module,
    config: OffloadConfig | None = None,
    *,
    layers: Sequence[nn.Module] | None = None,
    timeline: Timeline | None = None,
) -> Offloader:
    """Offload the decoder layers of `model` that the config does not keep resident.

    Everything is validated before the model is touched: on any error the model is as it was.

    Args:
        model: a transformers decoder model (its layer list is found by `find_decoder_layers`) or
            any nn.Module when `layers` is given.
        config: how to offload; `OffloadConfig()` (the "balanced" preset) when None.
        layers: the layers to manage, in execution order, for models without a known layer list.
        timeline: receives every step, transfer, compute and release (see `tracedoffload.timeline`).

    Returns:
        The running `Offloader`; `detach()` it (or use it as a context manager) to restore the model.

    Raises:
        ConfigError, LayerDiscoveryError, DeviceUnavailableError, HookConflictError.

    Example:
        >>> with offload(model, OffloadConfig(num_layers_on_gpu=8)) as offloader:
        ...     model.generate(input_ids, max_new_tokens=32)
    """
    if not isinstance(model, nn.Module):
        raise ConfigError("model", type(model).__name__, "a torch.nn.Module (a transformers model, or any module with layers=[...])")
    config = config if config is not None else OffloadConfig()
    if not isinstance(config, OffloadConfig):
        raise ConfigError("config", type(config).__name__, "an OffloadConfig")
    _refuse_existing_hooks(model)
    layer_list = check_layer_list(model, layers) if layers is not None else find_decoder_layers(model)[1]
    device = resolve_device(config.device)
    _check_weights(model, config)
    config = _resolve_tier(model, config)
    num_resident = config.layers_on_gpu(len(layer_list))
    resident = resident_layer_indices(config.residency, len(layer_list), num_resident)
    return Offloader(model, layer_list, config, device, resident, timeline or NullTimeline())


def resolve_device(spelling: str | torch.device) -> torch.device:
    """The compute device for a config's `device`, checked against this machine."""
    device = parse_device(spelling)
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device={str(spelling)!r} was asked for but torch sees no CUDA device "
                f"(torch {torch.__version__}, cuda {torch.version.cuda}); use device='cpu' or 'auto'"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device={str(spelling)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), 0 to {torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", index)
    return device


class Offloader:
    """Runs a model with only some decoder layers resident; built by `offload()`.

    Threading: the hooks run on the thread that calls the model; one model, one thread at a time.
    Blocking: no host synchronize on the hot path; `detach()` synchronizes once.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[nn.Module],
        config: OffloadConfig,
        device: torch.device,
        resident: Sequence[int],
        timeline: Timeline,
    ) -> None:
        self.model = model
        self.layers = layers
        self.config = config
        self.device = device
        self.resident_indices = tuple(resident)
        self.offloaded_indices = tuple(i for i in range(len(layers)) if i not in set(resident))
        self._streams: CpuStreams | CudaStreams = streams_for(device)
        self.timeline = timeline
        self.pinned = config.pin_memory and device.type == "cuda"
        self._offloaded: dict[int, _OffloadedLayer] = {}
        self._slots: list[_Slot] = []
        self._slot_of: dict[int, _Slot] = {}
        self._moved: list[tuple[torch.Tensor, torch.device]] = []  # resident tensors moved to the device
        self._handles: list[Any] = []
        self._compute_start: dict[int, Any] = {}
        self._observed_order: list[int] = []
        self._attached = False
        self._order: list[int] = list(range(len(layers)))
        self._upcoming: list[tuple[int, ...]] = []
        try:
            self._setup()
        except BaseException:
            self._restore()
            raise
        self._attached = True
        log.info(
            "offload.attached",
            device=str(device),
            layers=len(layers),
            resident=len(self.resident_indices),
            offloaded=len(self.offloaded_indices),
            pinned_bytes=self.pinned_bytes,
            device_pool_bytes=self.device_pool_bytes,
            prefetch=config.prefetch,
            residency=config.residency,
        )

    # -- public surface -------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of the offloaded layers' tensors (their packed host buffers)."""
        return sum(o.layout.nbytes for o in self._offloaded.values())

    @property
    def pinned_bytes(self) -> int:
        """Host bytes pinned by this offloader (0 on a CPU device, where pinning does not apply)."""
        return self.offloaded_bytes if self.pinned else 0

    @property
    def device_pool_bytes(self) -> int:
        """Bytes of the fixed device slot pool (min(prefetch + 1, offloaded layers) slots of the largest offloaded layer)."""
        return sum(s.flat.numel() for s in self._slots)

    @property
    def streams(self) -> CpuStreams | CudaStreams:
        """Where copies and computes are ordered (read by the tracing core for stream names and
        to give timing events back to the pool)."""
        return self._streams

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def host_buffer(self, index: int) -> torch.Tensor:
        """The packed host buffer of offloaded layer `index` (read-only by contract)."""
        return self._offloaded[index].host_flat

    def layer_bytes(self, index: int) -> int:
        """Bytes moved per transfer of offloaded layer `index`."""
        return self._offloaded[index].layout.nbytes

    def detach(self) -> None:
        """Restore the model: hooks removed, every tensor back on its original device, slots freed."""
        if not self._attached:
            return
        self._streams.synchronize()
        self._restore()
        self._attached = False
        log.info("offload.detached", layers=len(self.layers))

    def __enter__(self) -> Offloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- setup and teardown ---------------------------------------------------------------------

    def _setup(self) -> None:
        shared = tensors_shared_outside(self.model, {i: self.layers[i] for i in self.offloaded_indices})
        layouts = {i: plan_layout(layer_tensors(self.layers[i], shared[i])) for i in self.offloaded_indices}
        slot_bytes = max((lay.nbytes for lay in layouts.values()), default=0)
        # prefetch + 1 slots (the computing layer and those copied ahead), never more than there are
        # offloaded layers: a slot that could never be filled would only cost device memory.
        num_slots = min(self.config.prefetch + 1, len(layouts))
        # Allocate the device pool first: if it does not fit, nothing of the model has moved yet.
        for n in range(num_slots):
            flat = torch.empty(slot_bytes, dtype=torch.uint8, device=self.device)
            self._slots.append(_Slot(index=n, flat=flat, fences=self._streams.new_fences()))
        offloaded_ids = {id(item.tensor) for lay in layouts.values() for item in lay.tensors}
        self._move_resident_tensors(offloaded_ids)
        for index, layout in layouts.items():
            # Packed and pointed at one layer at a time, so host memory peaks at one extra layer.
            host_flat = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=self.pinned)
            original_devices = [item.tensor.device for item in layout.tensors]
            host_views = pack_into(layout, host_flat)
            for item, view in zip(layout.tensors, host_views):
                item.tensor.data = view
            self._offloaded[index] = _OffloadedLayer(
                index=index,
                layout=layout,
                host_flat=host_flat,
                host_views=host_views,
                slot_views=[[item.view_in(slot.flat) for item in layout.tensors] for slot in self._slots],
                original_devices=original_devices,
            )
        self._set_order(self._order)
        self._install_hooks()

    def _move_resident_tensors(self, offloaded_ids: set[int]) -> None:
        for tensor in _all_tensors(self.model):
            if id(tensor) in offloaded_ids or tensor.device == self.device:
                continue
            original = tensor.device
            tensor.data = tensor.data.to(self.device)
            self._moved.append((tensor, original))

    def _install_hooks(self) -> None:
        setattr(self.model, HOOK_ATTR, self)
        self._handles.append(self.model.register_forward_pre_hook(self._step_pre_hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._step_post_hook))
        for index, layer in enumerate(self.layers):
            setattr(layer, HOOK_ATTR, self)
            self._handles.append(layer.register_forward_pre_hook(_bind(self._pre_forward, index)))
            self._handles.append(layer.register_forward_hook(_bind(self._post_forward, index)))

    def _restore(self) -> None:
        """Undo whatever setup did, in reverse; safe to call on a half-built offloader."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in [self.model, *self.layers]:
            if getattr(module, HOOK_ATTR, None) is self:
                delattr(module, HOOK_ATTR)
        for offloaded in self._offloaded.values():
            for item, host_view, original in zip(offloaded.layout.tensors, offloaded.host_views, offloaded.original_devices):
                if original.type != "cpu":
                    item.tensor.data = host_view.to(original)
                elif self.pinned:
                    # Hand the weights back in ordinary pageable memory so no pinned bytes stay behind.
                    item.tensor.data = host_view.clone()
                else:
                    item.tensor.data = host_view
        self._offloaded.clear()
        for tensor, original in reversed(self._moved):
            tensor.data = tensor.data.to(original)
        self._moved.clear()
        self._slots.clear()
        self._slot_of.clear()

    @property
    def timeline(self) -> Timeline:
        """Where the boundaries go; settable (tracing attaches by replacing it)."""
        return self._timeline

    @timeline.setter
    def timeline(self, timeline: Timeline) -> None:
        self._timeline = timeline
        # Markers only for a timeline that reads them: a hook then pays one attribute call.
        self._timed = bool(getattr(timeline, "wants_markers", True))
        self._mark = self._streams.clock.mark if self._timed else _no_marker

    # -- the hooks ------------------------------------------------------------------------------

    @torch.compiler.disable
    def _step_pre_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self._observed_order = []
        if not self._timed:
            self.timeline.step_begin(None)
            return
        self.timeline.step_begin(self._mark(), *_input_shape(args, kwargs), _cached_tokens(kwargs))

    @torch.compiler.disable
    def _step_post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.timeline.step_end(self._mark())
        observed = self._observed_order
        if observed != self._order and sorted(observed) == list(range(len(self.layers))):
            # The layers ran in another order than listed: prefetch in the order they really run.
            log.info("offload.order_learned", order=observed)
            self._set_order(observed)

    @torch.compiler.disable
    def _pre_forward(self, index: int, module: nn.Module, args: Any) -> None:
        self._observed_order.append(index)
        offloaded = self._offloaded.get(index)
        if offloaded is not None:
            slot = self._slot_of.get(index)
            if slot is None:
                slot = self._claim_slot_on_demand()
                self._issue_copy(index, slot, prefetched=False)
            self._streams.wait_ready(slot.fences)
            slot.in_use = True
            for item, view in zip(offloaded.layout.tensors, offloaded.slot_views[slot.index]):
                item.tensor.data = view
        self._prefetch_after(index)
        self._compute_start[index] = self._mark()

    @torch.compiler.disable
    def _post_forward(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        end = self._mark()
        slot = self._slot_of.get(index)
        self.timeline.layer(
            LayerRecord(COMPUTE, index, self._compute_start.pop(index, end), end, 0, slot.index if slot else -1, False)
        )
        offloaded = self._offloaded.get(index)
        if offloaded is None or slot is None:
            return
        # Release: the tensors point back at the host buffer (no copy: weights are read-only) and
        # the slot is free once the kernels already queued on the compute stream have read it.
        for item, host_view in zip(offloaded.layout.tensors, offloaded.host_views):
            item.tensor.data = host_view
        self._streams.record_free(slot.fences)
        slot.layer = None
        slot.in_use = False
        del self._slot_of[index]
        self.timeline.layer(LayerRecord(RELEASE, index, end, self._mark(), offloaded.layout.nbytes, slot.index, False))
        self._prefetch_after(index)

    # -- scheduling -----------------------------------------------------------------------------

    def _set_order(self, order: list[int]) -> None:
        """Precompute, for each layer, the offloaded layers to have in flight once it starts."""
        self._order = list(order)
        offloaded_in_order = [i for i in self._order if i in self._offloaded]
        depth = self.config.prefetch
        upcoming: list[tuple[int, ...]] = [()] * len(self.layers)
        if offloaded_in_order and depth:
            position = {layer: n for n, layer in enumerate(self._order)}
            for layer in self._order:
                # The next `depth` offloaded layers after this one, wrapping into the next forward
                # pass, so the first offloaded layer's copy hides behind the previous step's tail.
                later = [i for i in offloaded_in_order if position[i] > position[layer]]
                cycle = later + [i for i in offloaded_in_order if i not in later]
                upcoming[layer] = tuple(i for i in cycle[:depth] if i != layer)
        self._upcoming = upcoming

    def _prefetch_after(self, index: int) -> None:
        for upcoming in self._upcoming[index]:
            if upcoming in self._slot_of:
                continue
            slot = self._free_slot()
            if slot is None:
                return
            self._issue_copy(upcoming, slot, prefetched=True)

    def _free_slot(self) -> _Slot | None:
        for slot in self._slots:
            if slot.layer is None:
                return slot
        return None

    def _claim_slot_on_demand(self) -> _Slot:
        slot = self._free_slot()
        if slot is not None:
            return slot
        # Every slot holds a prefetched layer that is not the one needed now (the model ran out of
        # the expected order): take one that is not computing. Stream order makes the new copy
        # land after the abandoned one, and nothing has read the abandoned layer yet.
        for slot in self._slots:
            if not slot.in_use:
                del self._slot_of[slot.layer]
                slot.layer = None
                return slot
        raise TracedOffloadError("every device slot is in use: offloaded layers must not call each other")

    def _issue_copy(self, index: int, slot: _Slot, prefetched: bool) -> None:
        offloaded = self._offloaded[index]
        nbytes = offloaded.layout.nbytes
        start, end = self._streams.copy(slot.flat[:nbytes], offloaded.host_flat, slot.fences, timed=self._timed)
        slot.layer = index
        self._slot_of[index] = slot
        self.timeline.layer(LayerRecord(TRANSFER, index, start, end, nbytes, slot.index, prefetched))


def _no_marker() -> None:
    return None


def _input_shape(args: Any, kwargs: dict[str, Any]) -> tuple[int, int]:
    """(rows, tokens per row) of a forward's input: its input_ids, else its inputs_embeds."""
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = args[0] if args else kwargs.get("inputs_embeds")
    shape = getattr(inputs, "shape", ())
    return (int(shape[0]), int(shape[1])) if len(shape) >= 2 else (1, 1)


def _cached_tokens(kwargs: dict[str, Any]) -> int | None:
    """Tokens in the forward's KV cache before it, when it has a cache that says (transformers'
    DynamicCache: read from its tensors' shapes, so no device sync); None otherwise."""
    cache = kwargs.get("cache")  # transformers 5's name; `past_key_values` before it
    if cache is None:
        cache = kwargs.get("past_key_values")
    length = getattr(cache, "get_seq_length", None)
    if length is None:
        return None
    try:
        return int(length())
    except Exception:  # a cache of another kind: unknown, never an error in the model's forward
        return None


def _bind(method: Any, index: int) -> Any:
    def hook(*args: Any) -> Any:
        return method(index, *args)

    return hook


def _resolve_tier(model: nn.Module, config: OffloadConfig) -> OffloadConfig:
    """A GPU-tier preset ("12gb", ...) becomes the manual layer count that fits the tier's memory."""
    from tracedoffload.planner import config_for_tier  # the planner imports this module

    if config.preset not in GPU_TIERS:
        return config
    fields = {f: getattr(config, f) for f in ("pin_memory", "prefetch", "residency", "device", "dtype")}
    return config_for_tier(model, config.preset, **fields)


def _refuse_existing_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        where = name or type(model).__name__
        if getattr(module, HOOK_ATTR, None) is not None:
            raise HookConflictError(f"{where} is already offloaded by tracedoffload; call offloader.detach() first")
        for attr, owner in FOREIGN_HOOK_ATTRS.items():
            if getattr(module, attr, None) is not None:
                raise HookConflictError(f"{where} carries an offload hook ({attr}) from {owner}")


def _check_weights(model: nn.Module, config: OffloadConfig) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta":
            raise TracedOffloadError(f"{name} is on the meta device: load the weights before offloading")
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise TracedOffloadError(f"{name} is a {tensor.layout}{' quantized' if tensor.is_quantized else ''} tensor; only dense tensors can be offloaded")
        if config.dtype is not None and tensor.is_floating_point() and isinstance(tensor, nn.Parameter):
            if tensor.dtype != config.dtype:
                raise ConfigError("dtype", config.dtype, f"the dtype of the model's weights ({name} is {tensor.dtype}), or None")


def _all_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append(tensor)
    return out
