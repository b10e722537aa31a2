"""Memory telemetry: readings per step, and a leak detector that knows what the live sequences'
KV caches hold."""
