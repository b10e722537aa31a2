"""Every span, attribute and event name tracedoffload emits. Dashboards, rules and the README are
checked against this module: change a name here and the tests point at every place that uses it.

Durations are integer nanoseconds in `*_ns` attributes (queryable as numbers in TraceQL), bytes
in `*_bytes`. GenAI names follow the OpenTelemetry GenAI semantic conventions.
"""

# -- span names -------------------------------------------------------------------------------
SPAN_TOKEN = "token"  # root of one token's trace: a prefill or decode step
SPAN_TRANSFER = "layer.transfer"  # host -> device copy of one offloaded layer
SPAN_COMPUTE = "layer.compute"  # one decoder layer's forward
SPAN_RELEASE = "layer.release"  # an offloaded layer's device slot handed back (no copy)
LAYER_SPANS = (SPAN_TRANSFER, SPAN_COMPUTE, SPAN_RELEASE)
GEN_AI_OPERATION = "text_completion"  # the generation span is named "{operation} {model}"

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

# -- offload configuration (generation and token spans) -----------------------------------------------
OFFLOAD_GPU_LAYERS = "tracedoffload.offload.gpu_layers"
OFFLOAD_CPU_LAYERS = "tracedoffload.offload.cpu_layers"
OFFLOAD_PREFETCH = "tracedoffload.offload.prefetch"
OFFLOAD_RESIDENCY = "tracedoffload.offload.residency"
OFFLOAD_PINNED = "tracedoffload.offload.pin_memory"
OFFLOAD_DEVICE = "tracedoffload.offload.device"
OFFLOAD_OFFLOADED_BYTES = "tracedoffload.offload.offloaded_bytes"
OFFLOAD_DEVICE_POOL_BYTES = "tracedoffload.offload.device_pool_bytes"
OFFLOAD_PINNED_BYTES = "tracedoffload.offload.pinned_bytes"

# -- generation and token -----------------------------------------------------------------------
GENERATION_ID = "generation.id"
TOKEN_INDEX = "token.index"
TOKEN_PHASE = "phase"  # PHASE_PREFILL or PHASE_DECODE
PHASE_PREFILL = "prefill"
PHASE_DECODE = "decode"
TOKEN_LAYER_DETAIL = "token.layer_detail"  # True when this token's layer spans were exported
TOKEN_SAMPLED_BY = "token.sampled_by"  # why: first, slow, relative, every_n, all, none
# Per-token sums over its layer spans, so totals survive sampled export (see stats.py).
TOKEN_COMPUTE_NS = "token.compute_ns"
TOKEN_TRANSFER_NS = "token.transfer_ns"
TOKEN_RELEASE_NS = "token.release_ns"
TOKEN_WAIT_NS = "token.wait_ns"
TOKEN_OVERLAP_NS = "token.overlap_ns"
TOKEN_TRANSFER_BYTES = "token.transfer_bytes"
TOKEN_TRANSFERS = "token.transfers"
TOKEN_PREFETCHED = "token.prefetched_transfers"  # transfers issued ahead of need
# Per-layer figures of the token, as integer arrays indexed by layer index, so the per-layer
# breakdown is complete even for tokens whose layer spans were not exported.
TOKEN_LAYERS_COMPUTE_NS = "token.layers.compute_ns"
TOKEN_LAYERS_TRANSFER_NS = "token.layers.transfer_ns"
TOKEN_LAYERS_RELEASE_NS = "token.layers.release_ns"
TOKEN_LAYERS_WAIT_NS = "token.layers.wait_ns"
TOKEN_LAYERS_OVERLAP_NS = "token.layers.overlap_ns"
TOKEN_LAYERS_TRANSFER_BYTES = "token.layers.transfer_bytes"
TOKEN_LAYER_ARRAYS = (
    TOKEN_LAYERS_COMPUTE_NS,
    TOKEN_LAYERS_TRANSFER_NS,
    TOKEN_LAYERS_RELEASE_NS,
    TOKEN_LAYERS_WAIT_NS,
    TOKEN_LAYERS_OVERLAP_NS,
    TOKEN_LAYERS_TRANSFER_BYTES,
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
EVENT_SLOW_TOKEN = "tracedoffload.slow_token"
EVENT_LEAK_SUSPECTED = "tracedoffload.leak_suspected"

# -- memory (token spans; absent when not readable, never 0) -----------------------------------------
MEMORY_HOST_RSS = "memory.host.rss_bytes"
MEMORY_HOST_RSS_DELTA = "memory.host.rss_delta_bytes"
MEMORY_DEVICE_ALLOCATED = "memory.device.allocated_bytes"
MEMORY_DEVICE_ALLOCATED_DELTA = "memory.device.allocated_delta_bytes"
MEMORY_DEVICE_RESERVED = "memory.device.reserved_bytes"
MEMORY_PINNED = "memory.host.pinned_bytes"
