"""Memory telemetry: readings per token, and a leak detector that knows the KV cache grows."""
