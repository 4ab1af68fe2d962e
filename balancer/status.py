"""
The status endpoint: per-backend state as JSON at C{/} (and C{/status})
and Prometheus metrics at C{/metrics}.

Metrics are computed from the balancer's state when scraped (a custom
collector), so the data path pays nothing for them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web import resource, server


def snapshot(balancer: Any) -> dict[str, Any]:
    """
    The balancer's state as plain data.
    """
    factory, pool = balancer.factory, balancer.pool
    now = balancer.reactor.seconds()
    backends = []
    for peer in pool.all_peers():
        a = peer.active
        backends.append(
            {
                "address": peer.key,
                "name": peer.name,
                "state": peer.state,
                "usable": peer.usable(now),
                "weight": peer.weight,
                "effective_weight": peer.effective_weight,
                "backup": peer.backup,
                "sources": sorted(peer.sources),
                "active": peer.conns,
                "total": peer.total,
                "fails": peer.passive.fails,
                "connect_failures": peer.failures,
                "passive_available": peer.passive.available(now),
                "logins": peer.logins,
                "check": {
                    "enabled": "checker" in peer.extra,
                    "health": a.health,
                    "rise": a.rise,
                    "fall": a.fall,
                    "last_result": (
                        None if a.last_result is None else ("ok" if a.last_result else "fail")
                    ),
                    "last_check": a.last_check,
                    "last_error": a.last_error,
                },
            }
        )
    data: dict[str, Any] = {
        "pid": os.getpid(),
        "algorithm": balancer.selector.algorithm,
        "accepted": factory.accepted,
        "rejected": factory.rejected,
        "connect_failures": factory.connect_failures,
        "active": len(factory.clients),
        "reloads": balancer.reloads,
        "backends": backends,
    }
    if balancer.discovery is not None:
        d = balancer.discovery
        data["discovery"] = {"polls": d.polls, "errors": d.errors, "last_ok": d.last_ok}
    return data


class _Collector:
    def __init__(self, balancer: Any) -> None:
        self.balancer = balancer

    def collect(self) -> Any:
        b = self.balancer
        f = b.factory
        yield CounterMetricFamily(
            "balancer_accepted_connections", "Client connections accepted", value=f.accepted
        )
        yield CounterMetricFamily(
            "balancer_rejected_connections",
            "Client connections closed because no backend could be reached",
            value=f.rejected,
        )
        yield CounterMetricFamily(
            "balancer_connect_failures", "Failed backend connection attempts",
            value=f.connect_failures,
        )
        yield GaugeMetricFamily(
            "balancer_active_connections", "Client connections open now",
            value=len(f.clients),
        )
        labels = ["backend", "name"]
        up = GaugeMetricFamily(
            "balancer_backend_up", "1 if the backend can be chosen now", labels=labels
        )
        state = GaugeMetricFamily(
            "balancer_backend_state", "Backend state (1 for the current one)",
            labels=labels + ["state"],
        )
        weight = GaugeMetricFamily("balancer_backend_weight", "Configured weight", labels=labels)
        active = GaugeMetricFamily(
            "balancer_backend_active_connections", "Open proxied connections", labels=labels
        )
        total = CounterMetricFamily(
            "balancer_backend_connections", "Proxied connections established", labels=labels
        )
        fails = CounterMetricFamily(
            "balancer_backend_connect_failures", "Failed connection attempts", labels=labels
        )
        health = GaugeMetricFamily(
            "balancer_backend_check_health", "Rise/fall health counter", labels=labels
        )
        now = b.reactor.seconds()
        for peer in b.pool.all_peers():
            lv = [peer.key, peer.name]
            up.add_metric(lv, 1 if peer.usable(now) else 0)
            for s in ("up", "down", "draining", "disabled"):
                state.add_metric(lv + [s], 1 if peer.state == s else 0)
            weight.add_metric(lv, peer.weight)
            active.add_metric(lv, peer.conns)
            total.add_metric(lv, peer.total)
            fails.add_metric(lv, peer.failures)
            health.add_metric(lv, peer.active.health)
        yield from (up, state, weight, active, total, fails, health)


class StatusResource(resource.Resource):
    isLeaf = True

    def __init__(self, balancer: Any) -> None:
        super().__init__()
        self.balancer = balancer
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(balancer))

    def render_GET(self, request: Any) -> bytes:
        path = request.path.rstrip(b"/")
        if path == b"/metrics":
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            return generate_latest(self.registry)
        if path in (b"", b"/status"):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(snapshot(self.balancer), indent=2).encode() + b"\n"
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"not found: try / or /metrics\n"


class _QuietSite(server.Site):
    def log(self, request: Any) -> None:
        pass  # scrapes every few seconds would flood the log


def status_site(balancer: Any) -> server.Site:
    site = _QuietSite(StatusResource(balancer))
    site.noisy = False
    site.displayTracebacks = False
    return site
