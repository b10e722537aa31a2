"""Planning before offloading: exact bytes per layer, KV-cache bytes, the VRAM table, GPU tiers and
`auto`.

Bytes come from the model itself, laid out exactly as the offloader packs them (so the planner's
bytes per layer equal `Offloader.layer_bytes`), and work on the `meta` device: a 7B config is
planned without allocating its weights.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tracedoffload._exceptions import ConfigError, DeviceUnavailableError, TracedOffloadError
from tracedoffload._packing import layer_tensors, plan_layout
from tracedoffload.config import PRESETS, OffloadConfig, scale_preset
from tracedoffload.layers import find_decoder_layers

GiB = 1 << 30
# Device memory of common GPU tiers (bytes); a tier preset keeps as many layers as fit in it.
GPU_TIERS: dict[str, int] = {
    "8gb": 8 * GiB,
    "12gb": 12 * GiB,
    "16gb": 16 * GiB,
    "24gb": 24 * GiB,
    "40gb": 40 * GiB,
    "80gb": 80 * GiB,
}
# PCIe 4.0 x16 measured pinned host-to-device rate (research/offloading-anchors.md): a default for
# the slowdown column, which is an estimate and says so.
DEFAULT_BANDWIDTH_GBPS = 25.0
DEFAULT_KV_TOKENS = 4096
# Room for activations and the allocator's slack, as a share of the resident weights, at least 512 MiB.
ACTIVATION_HEADROOM_SHARE = 0.10
MIN_ACTIVATION_HEADROOM = 512 << 20


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """The sizes that decide an offload plan."""

    num_layers: int
    layer_bytes: tuple[int, ...]  # packed bytes per decoder layer, as the offloader moves them
    base_bytes: int  # everything outside the decoder layers (embeddings, norm, head), tied counted once
    kv_bytes_per_token: int
    dtype: torch.dtype

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelPlan:
        """Plan a built model (real or on the meta device)."""
        layers = find_decoder_layers(model)[1]
        layer_ids = {id(t) for layer in layers for t in [*layer.parameters(), *layer.buffers()]}
        layer_bytes = tuple(plan_layout(layer_tensors(layer, set())).nbytes for layer in layers)
        seen: set[int] = set()
        base = 0
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) in seen or id(tensor) in layer_ids:
                continue
            seen.add(id(tensor))
            base += tensor.numel() * tensor.element_size()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        config = getattr(model, "config", None)
        kv = kv_bytes_per_token(config, dtype) if config is not None else 0
        return cls(len(layers), layer_bytes, base, kv, dtype)

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype = torch.float32) -> ModelPlan:
        """Plan a transformers config without allocating weights (built on the meta device)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return cls.from_model(model)

    @classmethod
    def from_path(cls, path: str | Path, dtype: torch.dtype | None = None) -> ModelPlan:
        """Plan a local model directory or a config.json file (reads only the config)."""
        from transformers import AutoConfig

        path = Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise TracedOffloadError(f"model={str(path)!r}: no config.json there (give a local model directory or a config.json path)")
        try:
            raw = json.loads(config_file.read_text())
            config = AutoConfig.for_model(**raw)
        except (ValueError, KeyError) as error:
            raise TracedOffloadError(f"model={str(path)!r}: config.json is not a transformers config ({error})") from None
        return cls.from_config(config, dtype or _config_dtype(config))

    @property
    def largest_layer(self) -> int:
        return max(self.layer_bytes, default=0)

    def offloaded_bytes(self, resident: Sequence[int]) -> int:
        keep = set(resident)
        return sum(b for i, b in enumerate(self.layer_bytes) if i not in keep)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes one token adds: keys and values of every layer's KV heads."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One line of the table: k resident layers and what it costs."""

    label: str
    gpu_layers: int
    offloaded_layers: int
    vram_bytes: int  # weights resident + device slot pool + KV cache + activation headroom
    vram_saved_bytes: int
    host_bytes: int  # the offloaded layers' host buffers (pinned when pin_memory is on)
    copy_ms_per_token: float  # offloaded bytes / bandwidth
    slowdown_no_overlap: float  # (compute + copy) / compute
    slowdown_full_overlap: float  # max(compute, copy) / compute


def estimate_vram(plan: ModelPlan, gpu_layers: int, *, prefetch: int = 1, kv_tokens: int = DEFAULT_KV_TOKENS, residency: str = "interleaved") -> int:
    """Device bytes for `gpu_layers` resident layers: resident weights, the slot pool (prefetch + 1
    slots of the largest offloaded layer, at most one per offloaded layer), the KV cache for
    `kv_tokens`, and activation headroom."""
    from tracedoffload.config import resident_layer_indices

    resident = resident_layer_indices(residency, plan.num_layers, gpu_layers)
    offloaded = [b for i, b in enumerate(plan.layer_bytes) if i not in set(resident)]
    weights = plan.base_bytes + sum(plan.layer_bytes[i] for i in resident)
    pool = min(prefetch + 1, len(offloaded)) * max(offloaded) if offloaded else 0
    headroom = max(MIN_ACTIVATION_HEADROOM, int(ACTIVATION_HEADROOM_SHARE * weights))
    return weights + pool + plan.kv_bytes_per_token * kv_tokens + headroom


def plan_table(
    plan: ModelPlan,
    *,
    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS,
    compute_ms_per_token: float | None = None,
    prefetch: int = 1,
    kv_tokens: int = DEFAULT_KV_TOKENS,
    every_k: bool = False,
) -> list[PlanRow]:
    """Rows for every preset (and every k with `every_k`), most resident layers first.

    `compute_ms_per_token` is the resident per-token compute time the slowdown is relative to; by
    default it is the time to read every weight once at 10x the copy bandwidth, a stated
    assumption (the slowdown columns are estimates; `bench/bench_offload.py` measures).
    """
    if not bandwidth_gbps > 0:
        raise ConfigError("bandwidth_gbps", bandwidth_gbps, "a rate in GB/s > 0")
    if kv_tokens < 0:
        raise ConfigError("kv_tokens", kv_tokens, "an integer >= 0")
    total = plan.base_bytes + sum(plan.layer_bytes)
    compute_ms = compute_ms_per_token if compute_ms_per_token is not None else total / (10 * bandwidth_gbps * 1e9) * 1e3
    if not compute_ms > 0:
        raise ConfigError("compute_ms_per_token", compute_ms_per_token, "milliseconds > 0")
    full = estimate_vram(plan, plan.num_layers, prefetch=prefetch, kv_tokens=kv_tokens)
    labels: dict[int, str] = {plan.num_layers: "resident"}
    for name, layers in PRESETS.items():
        labels.setdefault(scale_preset(layers, plan.num_layers), name)
    counts = range(plan.num_layers, -1, -1) if every_k else sorted(labels, reverse=True)
    rows = []
    from tracedoffload.config import resident_layer_indices

    for k in counts:
        offloaded = plan.offloaded_bytes(resident_layer_indices("interleaved", plan.num_layers, k))
        copy_ms = offloaded / (bandwidth_gbps * 1e9) * 1e3
        vram = estimate_vram(plan, k, prefetch=prefetch, kv_tokens=kv_tokens)
        rows.append(
            PlanRow(
                label=labels.get(k, ""),
                gpu_layers=k,
                offloaded_layers=plan.num_layers - k,
                vram_bytes=vram,
                vram_saved_bytes=full - vram,
                host_bytes=offloaded,
                copy_ms_per_token=copy_ms,
                slowdown_no_overlap=(compute_ms + copy_ms) / compute_ms,
                slowdown_full_overlap=max(compute_ms, copy_ms) / compute_ms,
            )
        )
    return rows


def format_table(rows: list[PlanRow], plan: ModelPlan, bandwidth_gbps: float, compute_ms_per_token: float | None = None) -> str:
    head = f"{'preset':<11}{'gpu':>4}{'cpu':>5}{'vram GiB':>10}{'saved GiB':>11}{'host GiB':>10}{'copy ms/tok':>13}{'slowdown':>16}"
    lines = [
        f"{plan.num_layers} layers, {plan.largest_layer / 2**20:.1f} MiB largest layer, base {plan.base_bytes / 2**20:.1f} MiB, "
        f"KV {plan.kv_bytes_per_token} B/token, {plan.dtype}, copies at {bandwidth_gbps:g} GB/s",
        head,
    ]
    for row in rows:
        lines.append(
            f"{row.label:<11}{row.gpu_layers:>4}{row.offloaded_layers:>5}{row.vram_bytes / GiB:>10.2f}{row.vram_saved_bytes / GiB:>11.2f}"
            f"{row.host_bytes / GiB:>10.2f}{row.copy_ms_per_token:>13.2f}{row.slowdown_full_overlap:>7.2f}-{row.slowdown_no_overlap:.2f}x"
        )
    basis = f"{compute_ms_per_token:g} ms/token resident compute (given)" if compute_ms_per_token else "resident compute assumed to read every weight once at 10x the copy rate (pass --compute-ms with a measured figure)"
    lines.append(f"slowdown: copies fully hidden behind compute - no overlap; {basis}. Estimates: bench/bench_offload.py measures.")
    return "\n".join(lines)


def fit_layers(plan: ModelPlan, budget_bytes: int, *, prefetch: int = 1, kv_tokens: int = DEFAULT_KV_TOKENS) -> int:
    """The most resident layers whose estimate fits `budget_bytes`."""
    for k in range(plan.num_layers, -1, -1):
        if estimate_vram(plan, k, prefetch=prefetch, kv_tokens=kv_tokens) <= budget_bytes:
            return k
    need = estimate_vram(plan, 0, prefetch=prefetch, kv_tokens=kv_tokens)
    raise ConfigError("device memory", f"{budget_bytes / GiB:.2f} GiB", f"at least {need / GiB:.2f} GiB even with every layer offloaded (base weights, slot pool, KV cache for {kv_tokens} tokens, headroom)")


def config_for_tier(model: nn.Module | ModelPlan, tier: str, **config: Any) -> OffloadConfig:
    """The manual config that fits a GPU tier's memory."""
    if tier not in GPU_TIERS:
        raise ConfigError("preset", tier, f"one of the GPU tiers {sorted(GPU_TIERS)}")
    plan = model if isinstance(model, ModelPlan) else ModelPlan.from_model(model)
    prefetch = config.get("prefetch", 1)
    return OffloadConfig(num_layers_on_gpu=fit_layers(plan, GPU_TIERS[tier], prefetch=prefetch), **config)


def auto_config(
    model: nn.Module | ModelPlan,
    *,
    target_utilization: float = 0.9,
    kv_tokens: int = DEFAULT_KV_TOKENS,
    headroom_bytes: int = 0,
    free_bytes: int | None = None,
    device: str = "cuda",
    **config: Any,
) -> OffloadConfig:
    """As many resident layers as fit in `target_utilization` of the free device memory.

    Free memory comes from `torch.cuda.mem_get_info` (it counts other processes) unless given.

    Raises:
        ConfigError: a bad argument, or not even zero resident layers fit.
        DeviceUnavailableError: no CUDA device to measure and no `free_bytes`.
    """
    if not 0 < target_utilization <= 1:
        raise ConfigError("target_utilization", target_utilization, "a share in (0, 1]")
    if headroom_bytes < 0:
        raise ConfigError("headroom_bytes", headroom_bytes, "bytes >= 0")
    if free_bytes is None:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("auto needs a CUDA device to read free memory from (or pass free_bytes=...)")
        free_bytes, _total = torch.cuda.mem_get_info(torch.device(device))
    plan = model if isinstance(model, ModelPlan) else ModelPlan.from_model(model)
    budget = int(free_bytes * target_utilization) - headroom_bytes
    prefetch = config.get("prefetch", 1)
    return OffloadConfig(num_layers_on_gpu=fit_layers(plan, budget, prefetch=prefetch, kv_tokens=kv_tokens), device=device, **config)


def _config_dtype(config: Any) -> torch.dtype:
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None) if not isinstance(name, torch.dtype) else name
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
