"""Prometheus metrics of one server, in a registry of its own: requests, errors by kind, queue depth,
tokens, time to first token and decode time. Labels are fixed words, never request content."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


class _EncoderCache(Collector):
    """Images asked about, images the encoder encoded, and the difference: the image-cache hits."""

    def __init__(self, images: Callable[[], float], encoded: Callable[[], float]) -> None:
        self._images, self._encoded = images, encoded

    def collect(self) -> Iterator[CounterMetricFamily]:
        images, encoded = self._images(), self._encoded()
        yield CounterMetricFamily("medgemma_image_encodes", "Images the encoder encoded (image-cache misses)",
                                  value=encoded)
        yield CounterMetricFamily("medgemma_image_cache_hits", "Images served from the embedding cache",
                                  value=max(0.0, images - encoded))


class Metrics:
    def __init__(self, encoded: Callable[[], int] = lambda: 0) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("medgemma_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("medgemma_errors", "Refused or failed requests by kind", ["kind"], registry=r)
        self.queue_depth = Gauge("medgemma_queue_depth", "Requests waiting for a slot", registry=r)
        self.slots_busy = Gauge("medgemma_slots_busy", "Slots generating now", registry=r)
        self.slots = Gauge("medgemma_slots", "Slots (--parallel)", registry=r)
        self.tokens = Counter("medgemma_tokens", "Tokens by kind: prompt, image, cached (reused), completion",
                              ["kind"], registry=r)
        self.images = Counter("medgemma_images", "Images in requests", registry=r)
        self.ttft = Histogram("medgemma_time_to_first_token_seconds", "Request start to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("medgemma_time_per_output_token_seconds", "Decode time per generated token",
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.duration = Histogram("medgemma_request_duration_seconds", "Chat completion requests, end to end",
                                  buckets=TTFT_BUCKETS, registry=r)
        self.n_images = 0  # counted beside the counter: the collector below needs the number
        r.register(_EncoderCache(lambda: float(self.n_images), lambda: float(encoded())))

    def asked_images(self, n: int) -> None:
        self.images.inc(n)
        self.n_images += n

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def answered(self, prompt: int, image: int, cached: int, completion: int, ttft_s: float,
                 decode_tps: float) -> None:
        for kind, n in (("prompt", prompt), ("image", image), ("cached", cached), ("completion", completion)):
            self.tokens.labels(kind=kind).inc(n)
        self.ttft.observe(ttft_s)
        if decode_tps > 0:
            self.per_token.observe(1.0 / decode_tps)

    def render(self) -> bytes:
        return generate_latest(self.registry)
