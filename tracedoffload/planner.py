"""Planning before offloading: bytes per layer, KV-cache bytes, the VRAM table, GPU tiers and `auto`.

Bytes come from the model itself, laid out exactly as the offloader packs them, so the planner's
bytes per layer equal `Offloader.layer_bytes`. Planning works on the `meta` device: a 7B config is
planned without allocating its weights.

The VRAM estimate for k resident layers is the sum of five terms (`VramEstimate`):

- base: every tensor outside the decoder layers (embeddings, final norm, lm_head; tied weights
  once), plus layer tensors shared outside their layer, which the offloader keeps resident;
- resident layers: the k resident layers' tensors;
- slot pool: min(prefetch + 1, offloaded layers) device slots of the largest offloaded layer, as
  the offloader allocates them (0 when nothing is offloaded);
- KV cache: `kv_bytes_per_token` x `kv_tokens` (every token the cache holds, across the batch);
- activations: the peak intermediates of one decoder layer for a forward over `kv_tokens` tokens
  (the worst case: the whole context prefilled in one pass), plus one position's logits.

Not modelled: the CUDA context, allocator rounding and fragmentation. They are what
`target_utilization` (and `headroom_bytes`) leave room for.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tracedoffload._checks import check_int, check_positive
from tracedoffload._exceptions import ConfigError, DeviceUnavailableError
from tracedoffload._packing import layer_tensors, plan_layout, tensors_shared_outside
from tracedoffload.config import OffloadConfig, parse_device, resident_layer_indices, scale_preset
from tracedoffload.layers import find_decoder_layers
from tracedoffload.presets import (
    DEFAULT_BANDWIDTH_GBPS,
    DEFAULT_DEVICE_MEMORY_GBPS,
    DEFAULT_KV_TOKENS,
    DEFAULT_TARGET_UTILIZATION,
    GPU_TIERS,
    PRESETS,
    GiB,
)
from tracedoffload.vram import VramEstimate, vram_from_sizes

_FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2}


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """The sizes of one model that decide an offload plan (bytes, no weights).

    Attributes:
        layer_bytes: per decoder layer, the bytes one transfer moves (the packed layout, 256-byte
            aligned), equal to `Offloader.layer_bytes(i)`.
        base_bytes: the tensors that are always resident (see the module docstring).
        kv_bytes_per_token: KV-cache growth per token; 0 when the model has no transformers config.
        activation_bytes_per_token: peak intermediates of one decoder layer per token of a forward.
        logits_bytes: one position's logits in the compute dtype plus generate's float32 copy.
        dtype: the weights' dtype.
        compute_dtype: the dtype of activations and KV cache (bfloat16 for float8 weights).
    """

    layer_bytes: tuple[int, ...]
    base_bytes: int
    kv_bytes_per_token: int
    activation_bytes_per_token: int
    logits_bytes: int
    dtype: torch.dtype
    compute_dtype: torch.dtype

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelPlan:
        """Plan a built model, with real weights or on the meta device (nothing is copied)."""
        return cls.from_layers(model, find_decoder_layers(model)[1])

    @classmethod
    def from_layers(cls, model: nn.Module, layers: list[nn.Module]) -> ModelPlan:
        """Plan a model whose decoder layers are `layers` (an offloader's list, which may have been
        given explicitly); offloaded or not, the sizes are the same."""
        # The offloader's own rule for tensors shared outside a layer: they stay resident.
        shared = tensors_shared_outside(model, dict(enumerate(layers)))
        layouts = [plan_layout(layer_tensors(layer, shared[i])) for i, layer in enumerate(layers)]
        moved = {id(item.tensor) for layout in layouts for item in layout.tensors}
        unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        base = sum(t.numel() * t.element_size() for key, t in unique.items() if key not in moved)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        compute = torch.bfloat16 if dtype in _FLOAT8 else dtype
        kv, activations, logits = _per_token_sizes(getattr(model, "config", None), compute)
        return cls(tuple(layout.nbytes for layout in layouts), base, kv, activations, logits, dtype, compute)

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype = torch.float32) -> ModelPlan:
        """Plan a transformers config without allocating weights (the model is built on `meta`).

        Float8 dtypes apply to the weight matrices (parameters of 2 or more dims); vectors (norms,
        biases) and the compute stay in bfloat16, as in weight-only float8 checkpoints.

        Raises:
            ConfigError: `dtype` is not a floating-point dtype, or the config has no causal LM.
        """
        from transformers import AutoModelForCausalLM

        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError("dtype", dtype, "a floating-point torch.dtype such as torch.bfloat16")
        build = torch.bfloat16 if dtype in _FLOAT8 else dtype
        try:
            with torch.device("meta"):
                # A copy: from_config writes the dtype into the config it is given.
                model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=build)
        except ValueError as error:
            raise ConfigError("config", type(config).__name__, f"a config with a causal LM class in transformers ({error})") from None
        if dtype in _FLOAT8:
            for param in model.parameters():
                if param.dim() >= 2:
                    param.data = param.data.to(dtype)
        return cls.from_model(model)

    @classmethod
    def from_pretrained_path(cls, path: str | Path, dtype: torch.dtype | None = None) -> ModelPlan:
        """Plan a local model directory or a config.json file, reading only the config.

        Args:
            path: a directory holding config.json (as `save_pretrained` writes it) or the file.
            dtype: the weights' dtype; None takes the config's `dtype`, else float32.

        Raises:
            ConfigError: no config.json at `path`, or it is not a transformers config.
        """
        from transformers import AutoConfig

        path = Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        valid = "a local model directory holding config.json, or the path of a config.json"
        if not config_file.is_file():
            raise ConfigError("path", str(path), f"{valid} (no config.json there)")
        try:
            # local_files_only: a mistyped path must never turn into a Hub download.
            config = AutoConfig.from_pretrained(str(config_file), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError("path", str(path), f"{valid}; reading it failed: {error}") from None
        return cls.from_config(config, dtype or _config_dtype(config))

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        """Every weight byte of the model (all layers resident)."""
        return self.base_bytes + sum(self.layer_bytes)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes one token adds: 2 (K and V) x layers x KV heads x head dim x dtype size.

    `head_dim` is the config's, else hidden_size // num_attention_heads. Assumes every layer keeps
    a full cache (no sliding window, no cross-layer sharing).
    """
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * _head_dim(config) * dtype.itemsize


def estimate_vram(
    plan: ModelPlan, gpu_layers: int, *, prefetch: int = 1, residency: str = "interleaved", kv_tokens: int = DEFAULT_KV_TOKENS
) -> VramEstimate:
    """Estimate device memory with `gpu_layers` resident layers.

    Resident layers are counted at their packed size, an upper bound by under 256 bytes a tensor
    (they move with `.to()`, unpacked).

    Raises:
        ConfigError: `gpu_layers`, `prefetch`, `residency` or `kv_tokens` out of range.
    """
    check_int("kv_tokens", kv_tokens, 0)
    return vram_from_sizes(
        plan.layer_bytes,
        plan.base_bytes,
        gpu_layers,
        prefetch=prefetch,
        residency=residency,
        kv_cache_bytes=plan.kv_bytes_per_token * kv_tokens,
        activation_bytes=plan.activation_bytes_per_token * kv_tokens + plan.logits_bytes,
    )


def fit_layers(
    plan: ModelPlan, budget_bytes: int, *, prefetch: int = 1, residency: str = "interleaved", kv_tokens: int = DEFAULT_KV_TOKENS
) -> int:
    """The most resident layers whose estimate fits `budget_bytes`.

    Raises:
        ConfigError: not even zero resident layers fit; the message gives both sizes.
    """
    for k in range(plan.num_layers, -1, -1):
        if estimate_vram(plan, k, prefetch=prefetch, residency=residency, kv_tokens=kv_tokens).total_bytes <= budget_bytes:
            return k
    need = estimate_vram(plan, 0, prefetch=prefetch, residency=residency, kv_tokens=kv_tokens)
    raise ConfigError(
        "device memory",
        f"{budget_bytes / GiB:.2f} GiB usable",
        f"at least {need.total_bytes / GiB:.2f} GiB even with every layer offloaded (base {need.base_bytes / GiB:.2f}, "
        f"slot pool {need.slot_pool_bytes / GiB:.2f}, KV cache for {kv_tokens} tokens {need.kv_cache_bytes / GiB:.2f}, "
        f"activations {need.activation_bytes / GiB:.2f}); lower kv_tokens or prefetch, or use a larger device",
    )


def auto_config(
    model: nn.Module | ModelPlan,
    *,
    target_utilization: float = DEFAULT_TARGET_UTILIZATION,
    kv_tokens: int = DEFAULT_KV_TOKENS,
    headroom_bytes: int = 0,
    free_bytes: int | None = None,
    device: str | torch.device = "auto",
    **config: Any,
) -> OffloadConfig:
    """The config keeping as many layers resident as fit in `target_utilization` x free - headroom.

    Args:
        model: the model (real or on `meta`) or its `ModelPlan`.
        target_utilization: share of the free memory to plan for, in (0, 1].
        kv_tokens: tokens the KV cache must hold (across the batch).
        headroom_bytes: bytes kept back on top, for what the estimate does not model.
        free_bytes: free device memory; None reads it with `torch.cuda.mem_get_info`, which counts
            every process's use (this one's CUDA context included), unlike the allocator's stats.
        device: the compute device of the returned config ("auto", "cuda", "cuda:N").
        **config: other `OffloadConfig` fields (prefetch, residency, pin_memory, dtype).

    Raises:
        ConfigError: an argument is out of range, or not even zero resident layers fit.
        DeviceUnavailableError: `free_bytes` is None and there is no CUDA device to read.

    Example:
        >>> config = auto_config(model, free_bytes=12 << 30, kv_tokens=2048)
        >>> offloader = offload(model, config)
    """
    if isinstance(target_utilization, bool) or not isinstance(target_utilization, (int, float)) or not 0 < target_utilization <= 1:
        raise ConfigError("target_utilization", target_utilization, "a share in (0, 1], e.g. 0.9")
    check_int("headroom_bytes", headroom_bytes, 0)
    if free_bytes is None:
        free_bytes = free_device_bytes(device)
    check_int("free_bytes", free_bytes, 1)
    for field in ("num_layers_on_gpu", "preset"):
        if field in config:
            raise ConfigError(field, config[field], "not given: auto_config chooses the resident layers")
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(OffloadConfig)})
    if unknown:
        raise ConfigError(unknown[0], config[unknown[0]], f"an OffloadConfig field: {[f.name for f in dataclasses.fields(OffloadConfig)]}")
    base = OffloadConfig(num_layers_on_gpu=0, device=device, **config)  # validates the fields first
    plan = model if isinstance(model, ModelPlan) else ModelPlan.from_model(model)
    budget = int(free_bytes * target_utilization) - headroom_bytes
    k = fit_layers(plan, budget, prefetch=base.prefetch, residency=base.residency, kv_tokens=kv_tokens)
    return dataclasses.replace(base, num_layers_on_gpu=k)


def config_for_tier(model: nn.Module | ModelPlan, tier: str, **kwargs: Any) -> OffloadConfig:
    """The config for a GPU tier preset: `auto_config` with the tier's memory as the free memory.

    A tier names the card's total memory; the CUDA context and other processes take part of it,
    which the default `target_utilization` of 0.9 leaves room for.

    Args:
        model: the model or its `ModelPlan`.
        tier: a key of `GPU_TIERS`.
        **kwargs: `auto_config` arguments (target_utilization, kv_tokens, headroom_bytes, device)
            and `OffloadConfig` fields.

    Raises:
        ConfigError: unknown tier, or the model does not fit the tier even fully offloaded.
    """
    if tier not in GPU_TIERS:
        raise ConfigError("preset", tier, f"one of the GPU tiers {list(GPU_TIERS)}")
    return auto_config(model, free_bytes=GPU_TIERS[tier], **kwargs)


def free_device_bytes(device: str | torch.device = "auto") -> int:
    """Free memory of a CUDA device as the driver reports it (other processes' use subtracted).

    Raises:
        DeviceUnavailableError: the device is not a CUDA device torch can use.
    """
    parsed = parse_device(device)
    if parsed is not None and parsed.type != "cuda":
        raise DeviceUnavailableError(f"device={str(device)!r}: free memory is read from a CUDA device; pass free_bytes=... to plan for another")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"no CUDA device to read free memory from (torch {torch.__version__}, cuda {torch.version.cuda}); pass free_bytes=... to plan without one"
        )
    return torch.cuda.mem_get_info(parsed or torch.device("cuda", torch.cuda.current_device()))[0]


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One line of the table: `gpu_layers` resident layers and what they cost."""

    label: str  # the preset(s) giving this many resident layers, "resident" for all, else ""
    gpu_layers: int
    offloaded_layers: int
    vram: VramEstimate
    vram_saved_bytes: int  # against every layer resident
    host_bytes: int  # the offloaded layers' host buffers (pinned with pin_memory on CUDA)
    copy_ms_per_token: float  # offloaded bytes / bandwidth: every offloaded layer is copied once a forward
    slowdown_no_overlap: float  # (compute + copy) / compute: copies never overlap compute
    slowdown_full_overlap: float  # max(compute, copy) / compute: copies fully hidden where they can be


@dataclasses.dataclass(frozen=True)
class PlanTable:
    """The rows and every assumption behind them."""

    plan: ModelPlan
    rows: tuple[PlanRow, ...]
    bandwidth_gbps: float
    compute_ms_per_token: float
    compute_basis: str  # where compute_ms_per_token comes from
    prefetch: int
    residency: str
    kv_tokens: int


def plan_table(
    plan: ModelPlan,
    *,
    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS,
    compute_ms_per_token: float | None = None,
    device_memory_gbps: float = DEFAULT_DEVICE_MEMORY_GBPS,
    prefetch: int = 1,
    residency: str = "interleaved",
    kv_tokens: int = DEFAULT_KV_TOKENS,
    every_k: bool = False,
) -> PlanTable:
    """A row per preset (scaled to the layer count) or, with `every_k`, per k; most resident first.

    Args:
        bandwidth_gbps: host-to-device copy rate in GB/s (1e9 bytes/s).
        compute_ms_per_token: measured per-token compute with every layer resident. None estimates
            it as memory-bound decode: every weight read once at `device_memory_gbps`, which is
            optimistic for compute, so the slowdowns lean high.
        device_memory_gbps: device memory bandwidth for that estimate.

    Raises:
        ConfigError: a rate or time is not a finite number > 0, or another argument is out of range.
    """
    check_positive("bandwidth_gbps", bandwidth_gbps)
    if compute_ms_per_token is None:
        compute_ms = plan.total_bytes / (check_positive("device_memory_gbps", device_memory_gbps) * 1e9) * 1e3
        basis = f"estimated: every weight read once at {device_memory_gbps:g} GB/s device memory bandwidth"
    else:
        compute_ms = check_positive("compute_ms_per_token", compute_ms_per_token)
        basis = "given"
    labels: dict[int, list[str]] = {plan.num_layers: ["resident"]}
    for name, layers in PRESETS.items():
        labels.setdefault(scale_preset(layers, plan.num_layers), []).append(name)
    counts = range(plan.num_layers, -1, -1) if every_k else sorted(labels, reverse=True)
    full = estimate_vram(plan, plan.num_layers, prefetch=prefetch, residency=residency, kv_tokens=kv_tokens).total_bytes
    rows = []
    for k in counts:
        vram = estimate_vram(plan, k, prefetch=prefetch, residency=residency, kv_tokens=kv_tokens)
        resident = set(resident_layer_indices(residency, plan.num_layers, k))
        host = sum(size for i, size in enumerate(plan.layer_bytes) if i not in resident)
        copy_ms = host / (bandwidth_gbps * 1e9) * 1e3
        rows.append(
            PlanRow(
                label="/".join(labels.get(k, [])),
                gpu_layers=k,
                offloaded_layers=plan.num_layers - k,
                vram=vram,
                vram_saved_bytes=full - vram.total_bytes,
                host_bytes=host,
                copy_ms_per_token=copy_ms,
                slowdown_no_overlap=(compute_ms + copy_ms) / compute_ms,
                slowdown_full_overlap=max(compute_ms, copy_ms) / compute_ms,
            )
        )
    return PlanTable(plan, tuple(rows), bandwidth_gbps, compute_ms, basis, prefetch, residency, kv_tokens)


def format_table(table: PlanTable) -> str:
    """The table as text, with the model's sizes above it and the assumptions below."""
    plan = table.plan
    lines = [
        f"{plan.num_layers} layers of {max(plan.layer_bytes) / 2**20:.1f} MiB (largest), base {plan.base_bytes / 2**20:.1f} MiB, "
        f"weights {_dtype_name(plan.dtype)}, KV {plan.kv_bytes_per_token} B/token x {table.kv_tokens} tokens, prefetch {table.prefetch}",
        f"{'preset':<18}{'gpu':>4}{'offl':>5}{'vram GiB':>10}{'saved GiB':>11}{'host GiB':>10}{'copy ms/tok':>13}{'slowdown':>16}",
    ]
    for row in table.rows:
        slowdown = f"{row.slowdown_full_overlap:.2f}-{row.slowdown_no_overlap:.2f}x"
        lines.append(
            f"{row.label:<18}{row.gpu_layers:>4}{row.offloaded_layers:>5}{row.vram.total_bytes / GiB:>10.2f}"
            f"{row.vram_saved_bytes / GiB:>11.2f}{row.host_bytes / GiB:>10.2f}{row.copy_ms_per_token:>13.2f}{slowdown:>16}"
        )
    lines += [
        "vram = base + resident layers + slot pool + KV cache + activations; CUDA context and allocator slack not included.",
        f"copies at {table.bandwidth_gbps:g} GB/s; slowdown = full overlap - no overlap, against {table.compute_ms_per_token:.2f} ms/token "
        f"resident compute ({table.compute_basis}). Estimates: bench/bench_offload.py measures.",
    ]
    return "\n".join(lines)


def table_to_dict(table: PlanTable) -> dict[str, Any]:
    """The table as JSON-ready data (dtypes as names, each row's VRAM total added)."""
    data = dataclasses.asdict(table)
    data["plan"].update(dtype=_dtype_name(table.plan.dtype), compute_dtype=_dtype_name(table.plan.compute_dtype), num_layers=table.plan.num_layers)
    for row, raw in zip(table.rows, data["rows"]):
        raw["vram"]["total_bytes"] = row.vram.total_bytes
    return data


def _per_token_sizes(config: Any, compute: torch.dtype) -> tuple[int, int, int]:
    """KV bytes per token, activation bytes per token and logits bytes; zeros without a
    transformers-style config (a plain nn.Module), since there are no attention sizes to read."""
    try:
        activations = _activation_elements_per_token(config) * compute.itemsize
        return kv_bytes_per_token(config, compute), activations, config.vocab_size * (compute.itemsize + 4)
    except AttributeError:
        return 0, 0, 0


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _activation_elements_per_token(config: Any) -> int:
    """Peak live intermediates of one decoder layer, in elements per token of a forward.

    The residual and the normed hidden states (2 x hidden) stay live across the layer; on top,
    the larger of attention and MLP. Attention: q and its output (2 x q_dim), k and v
    (2 x kv_dim), and k and v repeated to every query head when SDPA cannot use grouped heads
    natively (2 x q_dim). MLP: gate, up and their product (3 x intermediate). Attention scores are
    not materialised by SDPA's fused kernels; eager attention needs more (use headroom_bytes).
    """
    hidden = config.hidden_size
    head_dim = _head_dim(config)
    q_dim = config.num_attention_heads * head_dim
    kv_dim = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or getattr(config, "n_inner", None) or 4 * hidden
    return 2 * hidden + max(4 * q_dim + 2 * kv_dim, 3 * intermediate)


def _config_dtype(config: Any) -> torch.dtype:
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
