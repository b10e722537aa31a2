"""OTLP span (and metric) exporters from the OpenTelemetry SDK, chosen and configured as the OTel environment says.

Settings resolve as explicit argument -> `OTEL_EXPORTER_OTLP_TRACES_*` -> `OTEL_EXPORTER_OTLP_*`
-> default, as the OpenTelemetry exporter specification orders them. The exporters themselves are
the SDK's (`opentelemetry-exporter-otlp-proto-grpc` and `-proto-http`); this module only picks one
and checks the settings first, so a typo fails at setup with a message, not at the first export.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from typing import TYPE_CHECKING

from tracedoffload._exceptions import ConfigError
from tracedoffload.tracing.otel_env import PROTOCOLS, read_otel_environment

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

# The variables' names, as the SDK spells them (opentelemetry.sdk.environment_variables): written
# out here so that checking them imports no SDK module (the command line checks before it loads).
OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
OTEL_EXPORTER_OTLP_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
OTEL_EXPORTER_OTLP_TIMEOUT = "OTEL_EXPORTER_OTLP_TIMEOUT"
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
OTEL_EXPORTER_OTLP_TRACES_TIMEOUT = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"

__all__ = ["DEFAULT_TIMEOUT_S", "PROTOCOLS", "check_otlp_settings", "otlp_requested", "otlp_span_exporter"]

DEFAULT_PROTOCOL = "grpc"
# Short on purpose: the SDK waits 10 s per batch by default, all of it on the export thread while
# spans queue up behind it; a collector that is down should cost little.
DEFAULT_TIMEOUT_S = 5.0
_METRICS_PATH = "/v1/metrics"
_TRACES_PATH = "/v1/traces"
_VALID_PROTOCOLS = (
    "grpc or http/protobuf (http/json is not supported by the OpenTelemetry Python SDK's exporters)"
)


@dataclasses.dataclass(frozen=True, slots=True)
class _OtlpSettings:
    protocol: str
    endpoint: str | None  # None: the SDK exporter reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT
    timeout_s: float
    headers: dict[str, str] | None  # None: the SDK exporter reads OTEL_EXPORTER_OTLP_[TRACES_]HEADERS


def _env(*names: str) -> tuple[str, str] | None:
    """The first of `names` set to a non-blank value, with that value."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _resolve_protocol(protocol: str | None) -> str:
    source = "otlp_protocol"
    if protocol is None:
        found = _env(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL)
        if found is None:
            return DEFAULT_PROTOCOL
        source, protocol = found
    if not isinstance(protocol, str):
        raise ConfigError("otlp_protocol", protocol, _VALID_PROTOCOLS)
    normalised = protocol.strip().lower()
    if normalised not in PROTOCOLS:
        where = "" if source == "otlp_protocol" else f" (set by {source})"
        raise ConfigError("otlp_protocol", protocol, _VALID_PROTOCOLS + where)
    return normalised


def _resolve_timeout(timeout_s: float | None) -> float:
    field: str = "otlp_timeout_s"
    value: object = timeout_s
    if timeout_s is None:
        # The Python SDK reads these in seconds (the specification says milliseconds); so do we,
        # to mean what the SDK would have made of them.
        found = _env(OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, OTEL_EXPORTER_OTLP_TIMEOUT)
        if found is None:
            return DEFAULT_TIMEOUT_S
        field, value = found
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(field, value, "a positive number of seconds, e.g. 5")
    return seconds


def _with_signal_path(endpoint: str, signal_path: str) -> str:
    """A base endpoint gets the signal path, as OTEL_EXPORTER_OTLP_ENDPOINT does; a full one is kept."""
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/")
    if not path.endswith(signal_path):
        path += signal_path
    return urlunsplit(parts._replace(path=path))


# gRPC also takes what grpcio takes as a target: a bare `host:port`, or a name-resolver URI
# (`dns:///collector:4317`, `unix:///run/otel.sock`); the SDK passes those on as they are.
_HOST_PORT = re.compile(r"([A-Za-z0-9._\-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}")
_GRPC_RESOLVERS = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
_VALID_ENDPOINT = "a URL such as http://localhost:4317 (grpc) or http://localhost:4318 (http/protobuf), with a host and a port from 1 to 65535"


def _check_endpoint(field: str, endpoint: str, protocol: str) -> None:
    parts = urlsplit(endpoint)
    if parts.scheme in ("http", "https"):
        try:
            port = parts.port  # raises ValueError when not a number from 0 to 65535
        except ValueError:
            port = 0
        if parts.hostname and port != 0:
            return
    elif protocol == "grpc":
        if endpoint.startswith(_GRPC_RESOLVERS):
            return
        if _HOST_PORT.fullmatch(endpoint) and 0 < int(endpoint.rsplit(":", 1)[1]) <= 65535:
            return
    raise ConfigError(field, endpoint, _VALID_ENDPOINT)


def _resolve_endpoint(endpoint: object, protocol: str, signal_path: str) -> str:
    """An endpoint given as an argument, checked; for http/protobuf a base URL gets `signal_path`."""
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigError("otlp_endpoint", endpoint, "a URL such as http://localhost:4317, or None for the environment")
    endpoint = endpoint.strip()
    _check_endpoint("otlp_endpoint", endpoint, protocol)
    return _with_signal_path(endpoint, signal_path) if protocol == "http/protobuf" else endpoint


def _resolve_headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    if headers is None:
        return None
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError("otlp_headers", headers, "a mapping of header names to string values")
    # gRPC metadata keys must be lowercase; HTTP header names are case-insensitive.
    return {key.lower(): value for key, value in headers.items()}


def _resolve_settings(
    endpoint: str | None, protocol: str | None, timeout_s: float | None, headers: Mapping[str, str] | None
) -> _OtlpSettings:
    resolved_protocol = _resolve_protocol(protocol)
    if endpoint is not None:
        endpoint = _resolve_endpoint(endpoint, resolved_protocol, _TRACES_PATH)
    else:
        found = _env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT)
        if found is not None:
            _check_endpoint(*found, resolved_protocol)
    return _OtlpSettings(
        protocol=resolved_protocol,
        endpoint=endpoint,
        timeout_s=_resolve_timeout(timeout_s),
        headers=_resolve_headers(headers),
    )


def _build_exporter(settings: _OtlpSettings) -> SpanExporter:
    # Imported here: each exporter pulls in its transport (grpcio or requests), and only one is used.
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=settings.endpoint, headers=settings.headers, timeout=settings.timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=settings.endpoint, headers=settings.headers, timeout=settings.timeout_s)


def otlp_span_exporter(
    endpoint: str | None = None,
    protocol: str | None = None,
    *,
    timeout_s: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> SpanExporter:
    """Build the OpenTelemetry SDK's OTLP span exporter for the protocol asked for.

    Example:
        >>> exporter = otlp_span_exporter("http://localhost:4317", timeout_s=5)
        >>> provider.add_span_processor(BatchSpanProcessor(exporter))

    Args:
        endpoint: Collector URL. For gRPC, `http://host:4317` (plaintext) or `https://...`. For
            http/protobuf, a base URL (`http://host:4318`) gets `/v1/traces` appended, as for
            `OTEL_EXPORTER_OTLP_ENDPOINT`; a URL already ending in `/v1/traces` is used as is.
            None: the exporter reads `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then
            `OTEL_EXPORTER_OTLP_ENDPOINT`, then its default (localhost).
        protocol: "grpc" or "http/protobuf". None: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, then
            `OTEL_EXPORTER_OTLP_PROTOCOL`, then "grpc".
        timeout_s: Seconds per export, retries included. None: `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`,
            then `OTEL_EXPORTER_OTLP_TIMEOUT` (both in seconds, as the Python SDK reads them),
            then `DEFAULT_TIMEOUT_S`.
        headers: Extra request headers (gRPC metadata). None: the exporter reads
            `OTEL_EXPORTER_OTLP_TRACES_HEADERS` / `OTEL_EXPORTER_OTLP_HEADERS`.

    Returns:
        The SDK's `OTLPSpanExporter` (gRPC or HTTP). Its `export` blocks for up to the timeout
        and returns FAILURE when the collector cannot be reached; wrap it in `CountingExporter`
        to count what was lost. Construction does not connect.

    Raises:
        ConfigError: The protocol is unknown or "http/json" (not supported by the Python SDK),
            the timeout is not a positive number, the endpoint is not a URL, or a header is not
            a string; the message names the argument or environment variable to change.
    """
    return _build_exporter(_resolve_settings(endpoint, protocol, timeout_s, headers))


def check_otlp_settings(endpoint: str | None = None, protocol: str | None = None) -> None:
    """Resolve the OTLP settings now, as `otlp_span_exporter` would, without building anything:
    so a bad flag or variable fails before a model is loaded.

    Raises:
        ConfigError: as `otlp_span_exporter`.
    """
    _resolve_settings(endpoint, protocol, None, None)


def otlp_requested() -> bool:
    """Whether the environment asks for OTLP trace export.

    Never with `OTEL_SDK_DISABLED=true`. `OTEL_TRACES_EXPORTER` decides when set (a list naming
    `otlp`: yes; `none`, `console`: no); otherwise True when `OTEL_EXPORTER_OTLP_ENDPOINT` or
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (not blank).

    Raises:
        ConfigError: an OTEL_* variable holds a value the specification does not allow.
    """
    environment = read_otel_environment()
    if environment.sdk_disabled:
        return False
    if environment.traces_exporter_set:
        return "otlp" in environment.traces_exporters
    return _env(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is not None


def otlp_metric_exporter(endpoint: str | None = None, protocol: str | None = None, *, timeout_s: float | None = None) -> Any:
    """The SDK's OTLP metric exporter, resolved like `otlp_span_exporter` (protocol, timeout, and
    for http/protobuf a base endpoint gets `/v1/metrics`). With no endpoint the SDK exporter reads
    `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` itself.

    Raises:
        ConfigError: as `otlp_span_exporter`.
    """
    settings = _resolve_settings(None, protocol, timeout_s, None)
    if endpoint is not None:
        endpoint = _resolve_endpoint(endpoint, settings.protocol, _METRICS_PATH)
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

        return GrpcMetricExporter(endpoint=endpoint, timeout=settings.timeout_s)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

    return HttpMetricExporter(endpoint=endpoint, timeout=settings.timeout_s)
