"""Prometheus metrics for syncs: per-phase durations, bytes, outcomes, versions, fencing.

Each ``SyncMetrics`` owns its registry, so several coordinators (or tests) never collide; the
control plane exposes one at ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from weightsync.types import EngineSyncReport

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class SyncMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.phase_seconds = Histogram(
            "weightsync_phase_seconds", "Duration of one sync phase on one engine",
            ["engine", "phase", "mode"], buckets=_BUCKETS, registry=self.registry)
        self.bytes = Counter("weightsync_bytes", "Bytes received by an engine",
                             ["engine", "mode"], registry=self.registry)
        self.syncs = Counter("weightsync_syncs", "Syncs by engine and outcome",
                             ["engine", "outcome"], registry=self.registry)
        self.version = Gauge("weightsync_engine_version", "Weight version an engine serves",
                             ["engine"], registry=self.registry)
        self.fenced = Gauge("weightsync_engine_fenced", "1 while an engine is fenced",
                            ["engine"], registry=self.registry)

    def observe(self, report: EngineSyncReport, mode: str) -> None:
        for phase, seconds in report.seconds.items():
            self.phase_seconds.labels(report.engine, phase, mode).observe(seconds)
        self.bytes.labels(report.engine, mode).inc(report.nbytes)
        outcome = "ok" if report.ok else ("fenced" if report.fenced else "rolled_back")
        self.syncs.labels(report.engine, outcome).inc()
        if report.version >= 0:
            self.version.labels(report.engine).set(report.version)
        self.fenced.labels(report.engine).set(1 if report.fenced else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
