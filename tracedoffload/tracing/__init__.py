"""The tracing core: every layer transfer, compute and release as an OpenTelemetry span."""
