"""`tracedoffload serve`: an OpenAI-compatible server over the offloaded model.

    tracedoffload serve                                   # the default model on 127.0.0.1:8000
    tracedoffload serve --preset aggressive --max-batch-size 16
    curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi"}]}'

Takes `run`'s model, offload and telemetry flags. A request is greedy unless it gives a
`temperature` above 0 (then `top_p`, `top_k` and `seed` apply); `--greedy-only` refuses sampling
and decodes faster at large batches.

Secure by default: it binds 127.0.0.1; `--api-key` (or TRACEDOFFLOAD_API_KEY) asks every /v1/
request for `Authorization: Bearer <key>`; binding any other address without a key is refused
unless `--allow-unauthenticated`. Prompts and answers reach spans only with `--record-content`.
SIGTERM or Ctrl-C drains: /ready turns 503, new requests get 503, those in flight finish within
`--drain-timeout`, the telemetry is sent, and it exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from tracedoffload._exceptions import ConfigError
from tracedoffload.cli import model_flags, telemetry_flags

DEFAULT_PORT = 8000
API_KEY_VARIABLE = "TRACEDOFFLOAD_API_KEY"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `serve` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="serve the offloaded model over an OpenAI-compatible HTTP API, with continuous batching",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_flags.add_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: any free port)")
    server.add_argument("--max-batch-size", type=int, default=8, help="sequences per forward (default 8)")
    server.add_argument("--max-batch-tokens", type=int, default=256, help="tokens per forward, decodes and prefill chunks together (default 256)")
    server.add_argument("--max-context-tokens", type=int, default=2048, help="prompt plus completion, per request; sizes the KV cache (default 2048)")
    server.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before new ones get 429 (default 64)")
    server.add_argument("--default-max-tokens", type=int, default=256, help="completion tokens when a request does not say (default 256)")
    server.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    server.add_argument("--max-requests-per-client", type=int, default=16, help="requests one client address may have in flight, running and waiting (default 16; 0: no limit)")
    server.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds the requests in flight have to finish before they are cut off (default 30)")
    security = parser.add_argument_group("security")
    security.add_argument("--api-key", default=None, help=f"bearer token every /v1/ request must send (default: ${API_KEY_VARIABLE}; none: no authentication)")
    security.add_argument("--allow-unauthenticated", action="store_true", help="allow binding beyond loopback without an API key")
    security.add_argument("--record-content", action="store_true", help="put prompts and answers on the request spans (never otherwise; never in logs)")
    server.add_argument(
        "--greedy-only", action="store_true",
        help="refuse temperature above 0 and decode without per-request sampling warpers: faster at large batches (see the README's serve benchmark)",
    )
    telemetry_flags.add_arguments(parser)
    parser.set_defaults(handler=serve, max_new_tokens=None, progress=False, profile_every=None, metrics_linger=0.0)


def serve(args: argparse.Namespace) -> int:
    """Load, offload, start the engine and the HTTP server; on SIGTERM or Ctrl-C, stop serving,
    stop the engine, send the telemetry (within --export-budget) and exit 0."""
    from tracedoffload.logs import configure_logging

    configure_logging(args.log_format, args.log_level, stream=sys.stderr)
    if not 0 <= args.port <= 65535:
        raise ConfigError("port", args.port, "a TCP port from 1 to 65535, or 0 for any free port")
    if args.max_body_bytes < 1:
        raise ConfigError("max_body_bytes", args.max_body_bytes, "an integer >= 1")
    if not 0 < args.drain_timeout <= 3600:
        raise ConfigError("drain_timeout", args.drain_timeout, "seconds, more than 0 and at most 3600")
    api_key = _api_key(args)
    from tracedoffload.serve.engine import EngineSettings

    engine_settings = EngineSettings(
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_context_tokens=args.max_context_tokens,
        max_queue=args.max_queue,
        default_max_tokens=args.default_max_tokens,
        max_per_client=args.max_requests_per_client,
        sampling=not args.greedy_only,
    )
    settings = telemetry_flags.check_arguments(args, default_trace_file=False)
    config = model_flags.offload_config(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ConfigError("serve", "missing", "installed with its extra: pip install 'tracedoffload[serve]'") from None
    from tracedoffload.models import load_model
    from tracedoffload.offloader import offload, resolve_device
    from tracedoffload.serve.app import create_app
    from tracedoffload.serve.drain import DrainingServer
    from tracedoffload.serve.engine import Engine
    from tracedoffload.serve.metrics import ServerMetrics
    from tracedoffload.telemetry import Telemetry

    config, dtype = model_flags.with_dtype(config, args)
    device = resolve_device(args.device)
    print(f"tracedoffload: loading {args.model or 'the default model'}", file=sys.stderr, flush=True)
    loaded = load_model(args.model, dtype, seed=args.seed, notify=lambda message: print(f"tracedoffload: {message}", file=sys.stderr, flush=True))
    model, tokenizer, name = loaded.model, loaded.tokenizer, loaded.name
    offloader = offload(model, config) if config is not None else None
    if offloader is None:
        model.to(device)
    telemetry: Any = None
    if offloader is not None:
        # The paged KV cache is allocated when the engine starts, not per token: no KV growth to expect.
        telemetry = Telemetry(settings, offloader, name, 0, metrics=True)
        telemetry.start()
    registry, meters = _metric_sinks(telemetry)
    server_metrics = ServerMetrics(name, registry, meters)
    engine = Engine(model, tokenizer, name, engine_settings, telemetry.session if telemetry else None, metrics=server_metrics)
    engine.start()
    server_metrics.watch(engine)
    app = create_app(engine, registry=registry, max_body_bytes=args.max_body_bytes, metrics=server_metrics, api_key=api_key, record_content=args.record_content)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off"), engine, args.drain_timeout)
    auth = "API key required" if api_key else "no API key"
    print(f"tracedoffload: serving {name} on http://{args.host}:{args.port}/v1 (max batch {engine_settings.max_batch_size}; {auth})", file=sys.stderr, flush=True)
    try:
        server.run()  # returns once drained (SIGTERM / SIGINT), see serve/drain.py
    finally:
        engine.stop()
        if telemetry is not None:
            telemetry.close()
        if offloader is not None:
            offloader.detach()
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key or the environment; refuse to bind beyond loopback without one."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE) or None
    if key is not None and not key.strip():
        raise ConfigError("api_key", "(empty)", "a non-empty token")
    if key is None and not args.allow_unauthenticated and not _loopback(args.host):
        raise ConfigError(
            "host", args.host,
            f"a loopback address (127.0.0.1, ::1, localhost) without an API key: set --api-key or ${API_KEY_VARIABLE}, or pass --allow-unauthenticated to serve everyone who can reach it",
        )
    return key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve beyond loopback


def _metric_sinks(telemetry: Any) -> tuple[Any, Any]:
    """The registry and meter provider the server's metrics share with the model's; their own
    (served on /metrics) when the model has no telemetry (--trace-level off, --no-offload)."""
    if telemetry is not None and telemetry.registry is not None:
        return telemetry.registry, telemetry.meters
    from opentelemetry.metrics import NoOpMeterProvider
    from prometheus_client import CollectorRegistry

    return CollectorRegistry(), NoOpMeterProvider()
