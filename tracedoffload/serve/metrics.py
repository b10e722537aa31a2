"""The server's own metrics, beside the model's (`tracedoffload/metrics.py`), in the same two sinks:
the Prometheus registry `/metrics` serves (exemplars carry the request's trace id) and the
OpenTelemetry meter (OTLP, when a reader is configured).

What is counted as it happens: each request's outcome (`names.OUTCOMES`) and its time in line.
What is a level (requests waiting and running, KV-cache bytes in use and allocated, whether the
engine takes requests) is read from the engine when it is collected (a scrape, an OTLP export),
never on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tracedoffload import names as mn
from tracedoffload.metrics import TTFT_BUCKETS_S, exemplar_for


class ServerMetrics:
    """Instruments of one served model; `watch(engine)` names where the levels are read."""

    def __init__(self, model: str, registry: CollectorRegistry, meter_provider: MeterProvider) -> None:
        self.model = model
        self._engine: Any = None
        meter = meter_provider.get_meter("tracedoffload.serve")
        queue = mn.SERVER_QUEUE_DURATION
        self._queue = Histogram(queue.prometheus, queue.description, [mn.LABEL_MODEL], buckets=TTFT_BUCKETS_S, registry=registry)
        self._otel_queue = meter.create_histogram(queue.otel, unit=queue.unit, description=queue.description, explicit_bucket_boundaries_advisory=TTFT_BUCKETS_S)
        requests = mn.SERVER_REQUESTS
        self._requests = Counter(requests.prometheus.removesuffix("_total"), requests.description, [mn.LABEL_MODEL, mn.LABEL_OUTCOME], registry=registry)
        self._otel_requests = meter.create_counter(requests.otel, unit=requests.unit, description=requests.description)
        for outcome in mn.OUTCOMES:  # at 0 from the start: a rate has a first sample to measure from
            self._requests.labels(model, outcome)
        registry.register(_Levels(self))
        for name in _LEVELS:
            meter.create_observable_gauge(name.otel, callbacks=[self._observer(name)], unit=name.unit, description=name.description)

    def watch(self, engine: Any) -> None:
        self._engine = engine

    # -- as it happens (the event loop) -----------------------------------------------------------

    def request_ended(self, outcome: str) -> None:
        self._requests.labels(self.model, outcome).inc()
        self._otel_requests.add(1, {mn.LABEL_MODEL: self.model, mn.LABEL_OUTCOME: outcome})

    def queued(self, seconds: float, span_context: Any) -> None:
        """A request's time in line; the exemplar is its span."""
        exemplar, ctx = exemplar_for(span_context)
        self._queue.labels(self.model).observe(seconds, exemplar)
        self._otel_queue.record(seconds, {mn.LABEL_MODEL: self.model}, context=ctx)

    # -- levels (read when collected) -------------------------------------------------------------

    def levels(self) -> dict[mn.MetricName, float]:
        """Each level now; none while no engine is watched, and no KV figures before its cache exists."""
        engine = self._engine
        if engine is None:
            return {}
        values: dict[mn.MetricName, float] = {
            mn.SERVER_REQUESTS_WAITING: engine.admission.waiting,
            mn.SERVER_REQUESTS_RUNNING: engine.admission.inside,
            mn.SERVER_ENGINE_UP: 1 if engine.accepting else 0,
        }
        kv = engine.kv_cache_bytes()
        if kv is not None:
            values[mn.KV_CACHE_USAGE], values[mn.KV_CACHE_LIMIT] = kv
        return values

    def _observer(self, name: mn.MetricName) -> Any:
        def observe(options: CallbackOptions) -> Iterator[Observation]:
            value = self.levels().get(name)
            if value is not None:
                yield Observation(value, {mn.LABEL_MODEL: self.model})

        return observe


_LEVELS = (mn.SERVER_REQUESTS_WAITING, mn.SERVER_REQUESTS_RUNNING, mn.SERVER_ENGINE_UP, mn.KV_CACHE_USAGE, mn.KV_CACHE_LIMIT)


class _Levels(Collector):
    """The levels, as Prometheus gauges read at each scrape."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self.metrics.levels()
        for name in _LEVELS:
            if name in values:
                family = GaugeMetricFamily(name.prometheus, name.description, labels=[mn.LABEL_MODEL])
                family.add_metric([self.metrics.model], values[name])
                yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # no description at registration: collect() reads the engine, which may not exist yet
