"""What `GET /metrics` reports: requests per route and status, latency quantiles, generated tokens/s, batching,
requests per domain of an expert mixture; as JSON, or in Prometheus' text format
(`GET /metrics?format=prometheus`)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/ner", "/v1/models", "/health", "/metrics")
WINDOW_S = 60.0


class Metrics:
    def __init__(self, keep: int = 10_000):
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter = Counter()                    # (route, status) → count
        self.latency: dict[str, deque] = {}                   # route → recent latencies (seconds)
        self.keep = keep
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.recent_tokens: deque = deque()                   # (time, tokens) within WINDOW_S
        self.batches = 0
        self.batched_rows = 0
        self.largest_batch = 0
        self.cancelled = 0                                    # requests ended by a timeout or a client leaving
        self.domains: Counter = Counter()                     # (model, domain) → requests (expert mixtures)
        self.in_flight = 0
        self.waiting = 0

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES or path.startswith("/v1/models/") else "other"
        route = "/v1/models" if route.startswith("/v1/models/") else route
        with self.lock:
            self.requests[(route, status)] += 1
            self.latency.setdefault(route, deque(maxlen=self.keep)).append(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        now = time.time()
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated
            self.recent_tokens.append((now, generated))
            while self.recent_tokens and self.recent_tokens[0][0] < now - WINDOW_S:
                self.recent_tokens.popleft()

    def batch(self, rows: int) -> None:
        with self.lock:
            self.batches += 1
            self.batched_rows += rows
            self.largest_batch = max(self.largest_batch, rows)

    def domain(self, model: str, domain: str) -> None:
        with self.lock:
            self.domains[(model, domain)] += 1

    def cancel(self) -> None:
        with self.lock:
            self.cancelled += 1

    def snapshot(self) -> dict:
        now = time.time()
        with self.lock:
            by_route: dict = {}
            for (route, status), n in sorted(self.requests.items()):
                by_route.setdefault(route, {})[str(status)] = n
            latency = {route: _quantiles(list(values)) for route, values in self.latency.items() if values}
            domains: dict = {}
            for (model, domain), n in sorted(self.domains.items()):
                domains.setdefault(model, {})[domain] = n
            uptime = now - self.started
            recent = sum(t for when, t in self.recent_tokens if when >= now - WINDOW_S)
            window = min(WINDOW_S, uptime) or 1.0
            return {
                "uptime_s": round(uptime, 3),
                "requests": by_route,
                "requests_total": sum(self.requests.values()),
                "latency_ms": latency,
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "generated_tokens_per_s": round(self.generated_tokens / max(uptime, 1e-9), 3),
                "generated_tokens_per_s_last_60s": round(recent / window, 3),
                "batches": self.batches,
                "mean_batch_size": round(self.batched_rows / self.batches, 3) if self.batches else 0.0,
                "largest_batch": self.largest_batch,
                "cancelled": self.cancelled,
                "domains": domains,
                "in_flight": self.in_flight,
                "waiting": self.waiting,
            }


def _quantiles(values: list[float]) -> dict:
    values.sort()

    def q(p: float) -> float:
        return round(1000 * values[min(len(values) - 1, int(p * len(values)))], 3)
    return {"count": len(values), "p50": q(0.50), "p99": q(0.99)}


def prometheus_text(snapshot: dict) -> bytes:
    """The snapshot in Prometheus' text exposition format (names prefixed `lmforge_`), via prometheus_client."""
    # prometheus_client loads when /metrics is first read
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Snapshot:
        def collect(self):
            requests = CounterMetricFamily("lmforge_requests", "HTTP requests by route and status",
                                           labels=["route", "status"])
            for route, statuses in snapshot["requests"].items():
                for status, n in statuses.items():
                    requests.add_metric([route, status], n)
            yield requests
            latency = GaugeMetricFamily("lmforge_request_latency_seconds",
                                        "Request latency quantiles over the recent requests of each route",
                                        labels=["route", "quantile"])
            for route, q in snapshot["latency_ms"].items():
                for name, value in (("0.5", q["p50"]), ("0.99", q["p99"])):
                    latency.add_metric([route, name], value / 1000)
            yield latency
            yield CounterMetricFamily("lmforge_prompt_tokens", "Prompt tokens read", value=snapshot["prompt_tokens"])
            yield CounterMetricFamily("lmforge_generated_tokens", "Tokens generated",
                                      value=snapshot["generated_tokens"])
            yield CounterMetricFamily("lmforge_batches", "Generation batches run", value=snapshot["batches"])
            domains = CounterMetricFamily("lmforge_domain_requests", "Completion requests of an expert mixture by the "
                                          "domain its posterior chose", labels=["model", "domain"])
            for model, counts in snapshot["domains"].items():
                for domain, n in counts.items():
                    domains.add_metric([model, domain], n)
            yield domains
            yield CounterMetricFamily("lmforge_cancelled", "Requests ended by a timeout or a client leaving",
                                      value=snapshot["cancelled"])
            for name, help_, key in (
                    ("lmforge_generated_tokens_per_second", "Generated tokens/s over the last 60 s",
                     "generated_tokens_per_s_last_60s"),
                    ("lmforge_mean_batch_size", "Mean rows per generation batch", "mean_batch_size"),
                    ("lmforge_largest_batch", "Largest generation batch", "largest_batch"),
                    ("lmforge_in_flight", "Requests being served", "in_flight"),
                    ("lmforge_waiting", "Requests waiting for a slot", "waiting"),
                    ("lmforge_uptime_seconds", "Seconds since the server started", "uptime_s")):
                yield GaugeMetricFamily(name, help_, value=snapshot[key])
            queued = GaugeMetricFamily("lmforge_queued", "Requests queued per model", labels=["model"])
            for model, info in snapshot.get("models", {}).items():
                queued.add_metric([model], info["queued"])
            yield queued

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)
