"""Every name tracedoffload emits: spans, attributes and events, then metrics with their
Prometheus names. The README, the dashboards in dashboards/ and the alert rules in collectors/
are checked against this module by the tests: change a name here and they point at every place
that uses it.

Spans: durations are integer nanoseconds in `*_ns` attributes (queryable as numbers in TraceQL),
bytes in `*_bytes`. GenAI names follow the OpenTelemetry GenAI semantic conventions.

Metrics: OpenTelemetry names follow the semantic conventions where one exists (`gen_ai.server.*`,
`hw.gpu.memory.*`, `process.memory.*`) and are namespaced `tracedoffload.*` otherwise. The
Prometheus name is the OpenTelemetry name with dots as underscores and the unit suffix Prometheus
expects (`_seconds`, `_bytes`, `_total`), as the OpenTelemetry-to-Prometheus mapping does.
"""

from __future__ import annotations

import dataclasses

# -- span names -------------------------------------------------------------------------------
SPAN_STEP = "step"  # root of one forward pass's trace: the sequences it served and its layers
SPAN_TRANSFER = "layer.transfer"  # host -> device copy of one offloaded layer
SPAN_COMPUTE = "layer.compute"  # one decoder layer's forward
SPAN_RELEASE = "layer.release"  # an offloaded layer's device slot handed back (no copy)
LAYER_SPANS = (SPAN_TRANSFER, SPAN_COMPUTE, SPAN_RELEASE)
SPAN_DRAFT = "draft.forward"  # one forward of a speculative decoding's draft model, under the step verifying it
GEN_AI_OPERATION = "text_completion"  # the generation span is named "{operation} {model}"
GEN_AI_OPERATION_CHAT = "chat"  # a chat request's generation (serve's /v1/chat/completions)

# -- GenAI semantic conventions (generation span) -------------------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
PROVIDER = "tracedoffload"
SERVICE_NAME_DEFAULT = "tracedoffload"  # service.name when OTEL_SERVICE_NAME does not set one

# -- offload configuration (generation and step spans) -----------------------------------------------
OFFLOAD_GPU_LAYERS = "tracedoffload.offload.gpu_layers"
OFFLOAD_CPU_LAYERS = "tracedoffload.offload.cpu_layers"
OFFLOAD_PREFETCH = "tracedoffload.offload.prefetch"
OFFLOAD_RESIDENCY = "tracedoffload.offload.residency"
OFFLOAD_PINNED = "tracedoffload.offload.pin_memory"
OFFLOAD_DEVICE = "tracedoffload.offload.device"
OFFLOAD_OFFLOADED_BYTES = "tracedoffload.offload.offloaded_bytes"
OFFLOAD_DEVICE_POOL_BYTES = "tracedoffload.offload.device_pool_bytes"
OFFLOAD_PINNED_BYTES = "tracedoffload.offload.pinned_bytes"

# -- the model's sizes (generation span): the planner's figures, so a trace alone can be re-planned
# (`tracedoffload advise`) for another residency, prefetch depth or batch size -------------------
MODEL_LAYER_BYTES = "tracedoffload.model.layer_bytes"  # per decoder layer, the bytes one transfer moves
MODEL_BASE_BYTES = "tracedoffload.model.base_bytes"  # tensors outside the decoder layers (always resident)
MODEL_KV_BYTES_PER_TOKEN = "tracedoffload.model.kv_bytes_per_token"  # KV-cache growth per token held
MODEL_ACTIVATION_BYTES_PER_TOKEN = "tracedoffload.model.activation_bytes_per_token"  # one layer's peak intermediates per token of a forward
MODEL_LOGITS_BYTES = "tracedoffload.model.logits_bytes"  # one position's logits
MODEL_SIZE_ATTRIBUTES = (MODEL_LAYER_BYTES, MODEL_BASE_BYTES, MODEL_KV_BYTES_PER_TOKEN, MODEL_ACTIVATION_BYTES_PER_TOKEN, MODEL_LOGITS_BYTES)

# -- generation span ---------------------------------------------------------------------------
GENERATION_ID = "generation.id"  # also on a step that served exactly one generation
GENERATION_STEPS = "generation.steps"  # forwards that served it (its step events, up to a cap)
GENERATION_TTFT_NS = "generation.time_to_first_token_ns"  # start to the end of its prefill step
GENERATION_TPOT_NS = "generation.time_per_output_token_ns"  # after the first token, per output token
GENERATION_QUEUE_NS = "generation.queue_ns"  # serve: from arrival to a place in the engine's batch
GEN_AI_RESPONSE_ID = "gen_ai.response.id"  # serve: the answer's id (chatcmpl-..., cmpl-...)
REQUEST_ID = "request.id"  # serve: the x-request-id the answer carries (the caller's, or a new one)
REQUEST_PRIORITY = "request.priority"  # serve: the body's priority class
REQUEST_CHOICE = "request.choice"  # serve: which of the request's `n` choices this generation is (from 0)
# serve --record-content only (never otherwise): the request's messages and the answer, as JSON.
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
EVENT_STEP = "tracedoffload.step"  # on the generation span, per step that served it: the way to its step
EVENT_STEP_TRACE_ID = "step.trace_id"  # 32 hex: open it in Jaeger or Tempo
EVENT_STEP_SPAN_ID = "step.span_id"

# -- step (one forward pass) ----------------------------------------------------------------------
STEP_INDEX = "step.index"  # the session's forward count, from 0
STEP_PHASE = "step.phase"  # one of PHASES, or PHASE_MIXED when its sequences' phases differ
PHASE_PREFILL = "prefill"  # a whole prompt, or the last chunk of one (its first token is generated)
PHASE_PREFILL_CHUNK = "prefill_chunk"  # a chunk of a prompt that is not its last (nothing generated)
PHASE_DECODE = "decode"  # one new token
PHASE_VERIFY = "verify"  # several tokens checked at once (drafted tokens of speculative decoding)
PHASE_MIXED = "mixed"  # a step whose sequences are in different phases (continuous batching)
PHASES = (PHASE_PREFILL, PHASE_PREFILL_CHUNK, PHASE_DECODE, PHASE_VERIFY)
STEP_SEQUENCES = "step.sequences"  # how many sequences the forward served
STEP_GENERATIONS = "step.generations"  # how many generations it served (its links are capped)
STEP_TOKENS = "step.tokens"  # tokens it processed, over all its sequences
STEP_GENERATED_TOKENS = "step.generated_tokens"  # new tokens it produced, over all its sequences
STEP_KV_TOKENS = "step.kv_tokens"  # tokens held in KV caches after it, over every live sequence
STEP_DRAFTED_TOKENS = "step.drafted_tokens"  # speculative decoding: drafted tokens the forward verified
STEP_ACCEPTED_TOKENS = "step.accepted_tokens"  # of those, how many the model kept (absent: not known)
STEP_POSITION = "step.position"  # a single-sequence step: the sequence's position (tokens before)
# A step of several sequences: one entry per sequence, in the same order.
STEP_SEQUENCE_GENERATION_IDS = "step.sequence.generation_ids"
STEP_SEQUENCE_POSITIONS = "step.sequence.positions"
STEP_SEQUENCE_PHASES = "step.sequence.phases"
STEP_SEQUENCE_TOKENS = "step.sequence.tokens"
STEP_LAYER_DETAIL = "step.layer_detail"  # True when this step's layer spans were exported
STEP_SAMPLED_BY = "step.sampled_by"  # why: first, slow, relative, every_n, all, none
SAMPLED_BY_SLOW = "slow"  # slower than the absolute threshold (--slow-token-ms)
SAMPLED_BY_RELATIVE = "relative"  # slower than the running p95 times --relative-p95
# The reasons that make a step a slow one: such a step also carries the EVENT_SLOW_STEP event.
SLOW_STEP_REASONS = (SAMPLED_BY_SLOW, SAMPLED_BY_RELATIVE)
# Per-step sums over its layer spans, so totals survive sampled export (see stats.py).
STEP_COMPUTE_NS = "step.compute_ns"
STEP_TRANSFER_NS = "step.transfer_ns"
STEP_RELEASE_NS = "step.release_ns"
STEP_WAIT_NS = "step.wait_ns"
STEP_OVERLAP_NS = "step.overlap_ns"
STEP_TRANSFER_BYTES = "step.transfer_bytes"
STEP_DRAFT_NS = "step.draft_ns"  # the draft model's forwards before the step (its time includes them)
STEP_DRAFT_FORWARDS = "step.draft_forwards"
STEP_TRANSFERS = "step.transfers"
STEP_PREFETCHED = "step.prefetched_transfers"  # transfers issued ahead of need
# Per-layer figures of the step, as integer arrays indexed by layer index, so the per-layer
# breakdown is complete even for steps whose layer spans were not exported.
STEP_LAYERS_COMPUTE_NS = "step.layers.compute_ns"
STEP_LAYERS_TRANSFER_NS = "step.layers.transfer_ns"
STEP_LAYERS_RELEASE_NS = "step.layers.release_ns"
STEP_LAYERS_WAIT_NS = "step.layers.wait_ns"
STEP_LAYERS_OVERLAP_NS = "step.layers.overlap_ns"
STEP_LAYERS_TRANSFER_BYTES = "step.layers.transfer_bytes"
STEP_LAYER_ARRAYS = (
    STEP_LAYERS_COMPUTE_NS,
    STEP_LAYERS_TRANSFER_NS,
    STEP_LAYERS_RELEASE_NS,
    STEP_LAYERS_WAIT_NS,
    STEP_LAYERS_OVERLAP_NS,
    STEP_LAYERS_TRANSFER_BYTES,
)

# -- layer spans ----------------------------------------------------------------------------------------
LAYER_INDEX = "layer.index"
LAYER_OFFLOADED = "layer.offloaded"
LAYER_BYTES = "layer.bytes"
LAYER_GBPS = "layer.gbps"
LAYER_STREAM = "layer.stream"
LAYER_SLOT = "layer.slot"
LAYER_PREFETCHED = "layer.prefetched"
LAYER_WAIT_NS = "layer.wait_ns"  # compute: time it waited for its own copy to land
LAYER_OVERLAP_NS = "layer.overlap_ns"  # transfer: time it ran while some layer computed

# -- events -------------------------------------------------------------------------------------------------
EVENT_SLOW_STEP = "tracedoffload.slow_step"
EVENT_LEAK_SUSPECTED = "tracedoffload.leak_suspected"

# -- memory (step spans; absent when not readable, never 0) -----------------------------------------
MEMORY_HOST_RSS = "memory.host.rss_bytes"
MEMORY_HOST_RSS_DELTA = "memory.host.rss_delta_bytes"
MEMORY_DEVICE_ALLOCATED = "memory.device.allocated_bytes"
MEMORY_DEVICE_ALLOCATED_DELTA = "memory.device.allocated_delta_bytes"
MEMORY_DEVICE_RESERVED = "memory.device.reserved_bytes"
MEMORY_PINNED = "memory.host.pinned_bytes"
# The KV-cache growth per token the planner expects (what the leak detector allows for each token
# held; 0 for a cache allocated up front): with step.kv_tokens, the growth memory should show.
MEMORY_KV_EXPECTED_BYTES_PER_TOKEN = "memory.kv_cache.expected_bytes_per_token"


# == metrics ===================================================================================


@dataclasses.dataclass(frozen=True)
class MetricName:
    otel: str
    prometheus: str
    kind: str  # "histogram", "gauge" or "counter"
    unit: str
    description: str


def _m(otel: str, prometheus: str, kind: str, unit: str, description: str) -> MetricName:
    return MetricName(otel, prometheus, kind, unit, description)


# -- latency (histograms, seconds; exemplars carry the step's or the generation's trace id) ---------------------------
STEP_LATENCY = _m("tracedoffload.step.duration", "tracedoffload_step_duration_seconds", "histogram", "s", "Wall time of one forward pass (step), by its phase")
TIME_TO_FIRST_TOKEN = _m("gen_ai.server.time_to_first_token", "gen_ai_server_time_to_first_token_seconds", "histogram", "s", "Time from a generation's start to its first token")
TIME_PER_OUTPUT_TOKEN = _m("gen_ai.server.time_per_output_token", "gen_ai_server_time_per_output_token_seconds", "histogram", "s", "A generation's time per output token after the first")
REQUEST_DURATION = _m("gen_ai.server.request.duration", "gen_ai_server_request_duration_seconds", "histogram", "s", "Duration of one generation")
LAYER_TRANSFER = _m("tracedoffload.layer.transfer.duration", "tracedoffload_layer_transfer_duration_seconds", "histogram", "s", "Host-to-device copy of one offloaded layer")
LAYER_COMPUTE = _m("tracedoffload.layer.compute.duration", "tracedoffload_layer_compute_duration_seconds", "histogram", "s", "Forward of one decoder layer")

STEP_BATCH_SIZE = _m("tracedoffload.step.sequences", "tracedoffload_step_sequences", "histogram", "{sequence}", "Sequences served by one step: the batch size")
STEP_BATCH_TOKENS = _m("tracedoffload.step.tokens", "tracedoffload_step_tokens", "histogram", "{token}", "Tokens processed by one step, prompt chunks and decodes together")

# -- serve (the server's own; the gen_ai.server.* histograms above are per request there) -----------------
SERVER_QUEUE_DURATION = _m("tracedoffload.server.queue.duration", "tracedoffload_server_queue_duration_seconds", "histogram", "s", "Time a request waited in line before the engine took it")
SERVER_REQUESTS = _m("tracedoffload.server.requests", "tracedoffload_server_requests_total", "counter", "{request}", "Requests answered, by outcome (OUTCOMES)")
SERVER_REQUESTS_WAITING = _m("tracedoffload.server.requests.waiting", "tracedoffload_server_requests_waiting", "gauge", "{request}", "Requests in line for the engine")
SERVER_REQUESTS_RUNNING = _m("tracedoffload.server.requests.running", "tracedoffload_server_requests_running", "gauge", "{request}", "Requests in the engine's batch")
SERVER_ENGINE_UP = _m("tracedoffload.server.engine.up", "tracedoffload_server_engine_up", "gauge", "1", "1 while the engine takes requests; 0 once it failed, or while the server drains")
KV_CACHE_USAGE = _m("tracedoffload.kv_cache.usage", "tracedoffload_kv_cache_usage_bytes", "gauge", "By", "KV-cache bytes held by live sequences (serve's paged cache)")
KV_CACHE_LIMIT = _m("tracedoffload.kv_cache.limit", "tracedoffload_kv_cache_limit_bytes", "gauge", "By", "KV-cache bytes allocated up front (serve's paged cache)")

# -- counters -----------------------------------------------------------------------------------------
BYTES_COPIED = _m("tracedoffload.transfer.bytes", "tracedoffload_transfer_bytes_total", "counter", "By", "Bytes copied host to device")
STEPS = _m("tracedoffload.steps", "tracedoffload_steps_total", "counter", "{step}", "Forward passes (steps) completed")
GENERATED_TOKENS = _m("tracedoffload.generated_tokens", "tracedoffload_generated_tokens_total", "counter", "{token}", "New tokens produced, over every sequence")
DRAFTED_TOKENS = _m("tracedoffload.speculation.drafted_tokens", "tracedoffload_speculation_drafted_tokens_total", "counter", "{token}", "Drafted tokens verified by the model (speculative decoding)")
ACCEPTED_TOKENS = _m("tracedoffload.speculation.accepted_tokens", "tracedoffload_speculation_accepted_tokens_total", "counter", "{token}", "Drafted tokens the model kept (speculative decoding)")
THREAD_CPU = _m("tracedoffload.thread.cpu_time", "tracedoffload_thread_cpu_seconds_total", "counter", "s", "CPU time of the thread running the model and of the telemetry's threads, by thread")
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
LEAK_BYTES_PER_STEP = _m("tracedoffload.leak.bytes_per_step", "tracedoffload_leak_bytes_per_step", "gauge", "By", "Estimated leaked bytes per step, by source")
KV_TOKENS = _m("tracedoffload.kv_cache.tokens", "tracedoffload_kv_cache_tokens", "gauge", "{token}", "Tokens held in KV caches after the last step, over every live sequence")
KV_EXPECTED = _m("tracedoffload.kv_cache.expected_bytes_per_token", "tracedoffload_kv_cache_expected_bytes_per_token", "gauge", "By", "KV-cache growth per token the planner expects")

ALL: tuple[MetricName, ...] = tuple(v for v in dict(globals()).values() if isinstance(v, MetricName))

# Label names.
LABEL_PHASE = "phase"  # a step's phase: PHASES or PHASE_MIXED
LABEL_MODEL = "model"
LABEL_SOURCE = "source"  # memory source: "device" (torch allocator / NVML) or "host" (RSS + pinned)
LABEL_DEVICE = "device"
LABEL_OUTCOME = "outcome"  # a server request's end: one of OUTCOMES
OUTCOME_COMPLETED = "completed"  # answered whole (finish reason stop or length)
OUTCOME_REJECTED = "rejected"  # 429: the line was full
OUTCOME_CANCELLED = "cancelled"  # the client went away before its answer was done
OUTCOME_FAILED = "failed"  # 5xx: the engine failed, or the answer was cut by a drain's deadline
OUTCOME_INVALID = "invalid"  # 4xx other than 401 and 429: a bad body, an unknown model, a limit
OUTCOME_UNAUTHORIZED = "unauthorized"  # 401: no or a wrong API key
OUTCOME_UNAVAILABLE = "unavailable"  # 503: draining, or the engine is down
OUTCOMES = (OUTCOME_COMPLETED, OUTCOME_REJECTED, OUTCOME_CANCELLED, OUTCOME_FAILED, OUTCOME_INVALID, OUTCOME_UNAUTHORIZED, OUTCOME_UNAVAILABLE)
LABEL_THREAD = "thread"  # model (whichever thread runs the forwards), telemetry, export
