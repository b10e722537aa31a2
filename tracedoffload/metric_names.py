"""Every metric tracedoffload exports, with its Prometheus name. The alert rules in collectors/ and
the dashboards in dashboards/ are checked against this module by the tests.

OpenTelemetry names follow the semantic conventions where one exists (`gen_ai.server.*`,
`hw.gpu.memory.*`, `process.memory.*`) and are namespaced `tracedoffload.*` otherwise. The
Prometheus name is the OpenTelemetry name with dots as underscores and the unit suffix Prometheus
expects (`_seconds`, `_bytes`, `_total`), as the OpenTelemetry-to-Prometheus mapping does.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MetricName:
    otel: str
    prometheus: str
    kind: str  # "histogram", "gauge" or "counter"
    unit: str
    description: str


def _m(otel: str, prometheus: str, kind: str, unit: str, description: str) -> MetricName:
    return MetricName(otel, prometheus, kind, unit, description)


# -- latency (histograms, seconds; exemplars carry the token's trace id) ---------------------------
TOKEN_LATENCY = _m("tracedoffload.token.duration", "tracedoffload_token_duration_seconds", "histogram", "s", "Wall time of one token step (prefill or decode)")
TIME_TO_FIRST_TOKEN = _m("gen_ai.server.time_to_first_token", "gen_ai_server_time_to_first_token_seconds", "histogram", "s", "Time to the first generated token")
TIME_PER_OUTPUT_TOKEN = _m("gen_ai.server.time_per_output_token", "gen_ai_server_time_per_output_token_seconds", "histogram", "s", "Time per decode token")
REQUEST_DURATION = _m("gen_ai.server.request.duration", "gen_ai_server_request_duration_seconds", "histogram", "s", "Duration of one generation")
LAYER_TRANSFER = _m("tracedoffload.layer.transfer.duration", "tracedoffload_layer_transfer_duration_seconds", "histogram", "s", "Host-to-device copy of one offloaded layer")
LAYER_COMPUTE = _m("tracedoffload.layer.compute.duration", "tracedoffload_layer_compute_duration_seconds", "histogram", "s", "Forward of one decoder layer")

# -- counters -----------------------------------------------------------------------------------------
BYTES_COPIED = _m("tracedoffload.transfer.bytes", "tracedoffload_transfer_bytes_total", "counter", "By", "Bytes copied host to device")
TOKENS = _m("tracedoffload.tokens", "tracedoffload_tokens_total", "counter", "{token}", "Token steps completed")
SPANS_DROPPED = _m("tracedoffload.spans.dropped", "tracedoffload_spans_dropped_total", "counter", "{span}", "Spans lost before export")
ALLOC_RETRIES = _m("tracedoffload.cuda.alloc_retries", "tracedoffload_cuda_alloc_retries_total", "counter", "{retry}", "CUDA caching allocator retries (cache flushes to satisfy an allocation)")
OOMS = _m("tracedoffload.cuda.ooms", "tracedoffload_cuda_ooms_total", "counter", "{oom}", "CUDA out-of-memory errors seen by the caching allocator")

# -- memory (gauges, bytes) ---------------------------------------------------------------------------------
GPU_MEMORY_USAGE = _m("hw.gpu.memory.usage", "hw_gpu_memory_usage_bytes", "gauge", "By", "Device memory used (NVML), per device")
GPU_MEMORY_LIMIT = _m("hw.gpu.memory.limit", "hw_gpu_memory_limit_bytes", "gauge", "By", "Device memory size (NVML), per device")
GPU_PROCESS_MEMORY = _m("tracedoffload.gpu.process.memory.usage", "tracedoffload_gpu_process_memory_usage_bytes", "gauge", "By", "Device memory used by this process (NVML)")
CUDA_ALLOCATED = _m("tracedoffload.cuda.memory.allocated", "tracedoffload_cuda_memory_allocated_bytes", "gauge", "By", "Bytes held by tensors (torch caching allocator)")
CUDA_RESERVED = _m("tracedoffload.cuda.memory.reserved", "tracedoffload_cuda_memory_reserved_bytes", "gauge", "By", "Bytes reserved by the torch caching allocator")
CUDA_PEAK = _m("tracedoffload.cuda.memory.peak", "tracedoffload_cuda_memory_peak_bytes", "gauge", "By", "Peak bytes held by tensors")
PROCESS_RSS = _m("process.memory.usage", "process_memory_usage_bytes", "gauge", "By", "Resident set size of this process")
PINNED_HOST = _m("tracedoffload.host.pinned", "tracedoffload_host_pinned_bytes", "gauge", "By", "Pinned host bytes held by the offloader")
QUIET_POINT = _m("tracedoffload.memory.quiet_point", "tracedoffload_memory_quiet_point_bytes", "gauge", "By", "Memory at the last quiet point (after a step, all layers released), by source")

# -- leak detector --------------------------------------------------------------------------------------------
LEAK_SUSPECTED = _m("tracedoffload.leak.suspected", "tracedoffload_leak_suspected", "gauge", "1", "1 while the leak detector suspects a leak, by source")
LEAK_BYTES_PER_TOKEN = _m("tracedoffload.leak.bytes_per_token", "tracedoffload_leak_bytes_per_token", "gauge", "By", "Estimated leaked bytes per token, by source")
KV_EXPECTED = _m("tracedoffload.kv_cache.expected_bytes_per_token", "tracedoffload_kv_cache_expected_bytes_per_token", "gauge", "By", "KV-cache growth per token the planner expects")

ALL: tuple[MetricName, ...] = tuple(v for v in dict(globals()).values() if isinstance(v, MetricName))

# Label names.
LABEL_PHASE = "phase"  # prefill / decode
LABEL_MODEL = "model"
LABEL_SOURCE = "source"  # memory source: "device" (torch allocator / NVML) or "host" (RSS + pinned)
LABEL_DEVICE = "device"
