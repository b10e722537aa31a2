"""The OTEL_* environment variables, read and checked in one place before any model loads.

Each variable means what the OpenTelemetry specification says it means, and a value the
specification does not allow is refused with a `ConfigError` naming the variable (the SDK would
log a warning and carry on with something else, or export a malformed attribute):

    OTEL_SDK_DISABLED            true or false: true means no telemetry leaves the process
    OTEL_TRACES_EXPORTER         comma-separated: otlp, console, none
    OTEL_METRICS_EXPORTER        comma-separated: otlp, console, none
    OTEL_LOGS_EXPORTER           console or none (log lines go to stderr; there is no OTLP log export)
    OTEL_RESOURCE_ATTRIBUTES     key=value,key=value (values percent-encoded)
    OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]HEADERS      key=value,key=value
    OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]COMPRESSION  gzip or none

The endpoint, protocol and timeout variables are checked where the exporters are built
(`tracedoffload.tracing.exporters.otlp`). No OpenTelemetry import here: the command line reads
this module before it decides to load anything heavy.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from urllib.parse import unquote

from tracedoffload._exceptions import ConfigError

OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"
OTEL_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
OTEL_METRICS_EXPORTER = "OTEL_METRICS_EXPORTER"
OTEL_LOGS_EXPORTER = "OTEL_LOGS_EXPORTER"
OTEL_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_METRICS_HEADERS")
COMPRESSION_VARIABLES = ("OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION")

PROTOCOLS = ("grpc", "http/protobuf")  # OTLP transports the Python SDK's exporters offer
TRACES_EXPORTERS = ("otlp", "console", "none")
METRICS_EXPORTERS = ("otlp", "console", "none")
LOGS_EXPORTERS = ("console", "none")
_WHY_NOT = {
    "zipkin": "the Zipkin exporter is not installed; send OTLP to a collector that forwards to Zipkin",
    "jaeger": "Jaeger takes OTLP directly (port 4317 or 4318): use otlp",
    "logging": "'logging' was renamed 'console' in the specification",
    "prometheus": "serve Prometheus metrics with --metrics-port",
    "otlp": "log lines go to stderr (structlog); there is no OTLP log export",
}
# An HTTP header name or resource attribute key: RFC 7230's token characters.
_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_KEY_VALUE = "comma-separated key=value pairs (W3C Baggage format, values percent-encoded), e.g. key1=value1,key2=value2"


@dataclasses.dataclass(frozen=True)
class OtelEnvironment:
    """What the OTEL_* variables ask for, checked.

    `traces_exporters` / `metrics_exporters` name the exporters to build ("otlp", "console"); an
    empty tuple means none. `*_exporter_set` says whether the variable was set at all: unset,
    tracedoffload exports OTLP only when an endpoint is configured (a flag or a variable).
    """

    sdk_disabled: bool = False
    traces_exporters: tuple[str, ...] = ("otlp",)
    traces_exporter_set: bool = False
    metrics_exporters: tuple[str, ...] = ("otlp",)
    metrics_exporter_set: bool = False
    resource_attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)


def read_otel_environment(environ: Mapping[str, str] | None = None) -> OtelEnvironment:
    """Read and check the OTEL_* variables of `environ` (default: the process environment).

    Raises:
        ConfigError: a variable holds a value the specification does not allow; the field is the
            variable's name and the message says what is valid.
    """
    environ = os.environ if environ is None else environ
    for name in HEADER_VARIABLES:
        _key_values(name, environ.get(name, ""))
    for name in COMPRESSION_VARIABLES:
        value = environ.get(name, "").strip().lower()
        if value not in ("", "gzip", "none"):
            raise ConfigError(name, environ[name], "gzip or none")
    _exporters(OTEL_LOGS_EXPORTER, environ.get(OTEL_LOGS_EXPORTER, ""), LOGS_EXPORTERS)
    traces = _exporters(OTEL_TRACES_EXPORTER, environ.get(OTEL_TRACES_EXPORTER, ""), TRACES_EXPORTERS)
    metrics = _exporters(OTEL_METRICS_EXPORTER, environ.get(OTEL_METRICS_EXPORTER, ""), METRICS_EXPORTERS)
    return OtelEnvironment(
        sdk_disabled=_boolean(OTEL_SDK_DISABLED, environ.get(OTEL_SDK_DISABLED, "")),
        traces_exporters=("otlp",) if traces is None else traces,
        traces_exporter_set=traces is not None,
        metrics_exporters=("otlp",) if metrics is None else metrics,
        metrics_exporter_set=metrics is not None,
        resource_attributes=_key_values(OTEL_RESOURCE_ATTRIBUTES, environ.get(OTEL_RESOURCE_ATTRIBUTES, "")),
    )


def _boolean(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("", "false"):
        return False
    if value == "true":
        return True
    raise ConfigError(name, raw, "true or false")


def _exporters(name: str, raw: str, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    """The exporters a comma-separated list names, or None when the variable is unset or blank."""
    if not raw.strip():
        return None
    members = [member.strip().lower() for member in raw.split(",")]
    valid = f"a comma-separated list of {', '.join(allowed)}"
    for member in members:
        if member not in allowed:
            hint = f" ({_WHY_NOT[member]})" if member in _WHY_NOT else ""
            raise ConfigError(name, raw, f"{valid}; {member!r} is not one{hint}" if member else f"{valid}, without empty entries")
    if "none" in members and len(members) > 1:
        raise ConfigError(name, raw, f"{valid}; 'none' stands alone")
    return tuple(dict.fromkeys(member for member in members if member != "none"))


def _key_values(name: str, raw: str) -> dict[str, str]:
    """A W3C-Baggage-style list (`k1=v1,k2=v2`, values percent-encoded); blank means empty."""
    if not raw.strip():
        return {}
    pairs: dict[str, str] = {}
    for member in raw.split(","):
        key, equals, value = member.partition("=")
        key = key.strip()
        if not equals or not _KEY.fullmatch(key):
            raise ConfigError(name, raw, f"{_KEY_VALUE}; {member.strip()!r} is not key=value with a key of letters, digits and !#$%&'*+-.^_`|~")
        pairs[key] = unquote(value.strip())
    return pairs
