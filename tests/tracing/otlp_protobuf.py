"""Reading OTLP/JSON text back through protobuf, to compare it with the SDK's own encoder."""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON carries ids as hex; protobuf's JSON parser wants bytes fields as base64."""
    if isinstance(node, dict):
        return {
            key: (
                base64.b64encode(bytes.fromhex(value)).decode()
                if key in ("traceId", "spanId", "parentSpanId") and value
                else hex_ids_to_base64(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [hex_ids_to_base64(item) for item in node]
    return node


def parse_as_protobuf(line: str) -> ExportTraceServiceRequest:
    return json_format.Parse(json.dumps(hex_ids_to_base64(json.loads(line))), ExportTraceServiceRequest())
