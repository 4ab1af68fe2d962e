"""
The status endpoint: per-backend state as JSON at C{/} (and C{/status})
and Prometheus metrics at C{/metrics}.

Metrics are computed from the balancer's state when scraped (a custom
collector), so the data path pays nothing for them.

The endpoint is unauthenticated; bind it to a private interface.  It
answers C{GET} and C{HEAD} only: any other method gets C{405} at once,
from the request line, without a byte of the body being read.  Headers
must be complete within C{headerTimeout} seconds, at most
C{maxConnections} status connections are open at a time, and each
connection serves one request.

With C{--workers}, the first process also asks every worker for its
snapshot (over a private unix socket, see L{balancer.workers}) and shows
them under C{workers}, with the sums under C{total}.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.logger import Logger
from twisted.web import http, resource, server

#: status connections open at a time
MAX_CONNECTIONS = 64
#: seconds a client has to send the request line and headers
HEADER_TIMEOUT = 5.0
#: seconds a status connection may stay idle
IDLE_TIMEOUT = 10.0

#: the counters summed over the workers under C{total}
SUMMED = ("accepted", "rejected", "connect_failures", "active", "proxy_timeout_closed")


def snapshot(balancer: Any) -> dict[str, Any]:
    """
    The balancer's state as plain data.
    """
    factory, pool = balancer.factory, balancer.pool
    now = balancer.reactor.seconds()
    backends = []
    for peer in pool.allPeers():
        a = peer.active
        backends.append(
            {
                "address": peer.key,
                "name": peer.name,
                "state": peer.state,
                "usable": peer.usable(now),
                "weight": peer.weight,
                "effective_weight": peer.effectiveWeight,
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
                        None if a.lastResult is None else ("ok" if a.lastResult else "fail")
                    ),
                    "last_check": a.lastCheck,
                    "last_error": a.lastError,
                },
            }
        )
    data: dict[str, Any] = {
        "pid": os.getpid(),
        "algorithm": balancer.selector.algorithm,
        "accepted": factory.accepted,
        "rejected": factory.rejected,
        "connect_failures": factory.connectFailures,
        "active": len(factory.clients),
        "proxy_timeout": factory.proxyTimeout,
        "proxy_timeout_closed": factory.idleSweep.expired,
        "reloads": balancer.reloads,
        "reload_failures": balancer.reloadFailures,
        "last_reload_error": balancer.lastReloadError,
        "backends": backends,
    }
    if balancer.discovery is not None:
        d = balancer.discovery
        data["discovery"] = {
            "redis": d.redactedURL,
            "polls": d.polls,
            "errors": d.errors,
            "consecutive_errors": d.consecutiveErrors,
            "last_ok": d.lastOk,
            "last_error": d.lastError,
            "last_error_time": d.lastErrorTime,
        }
    return data


def combine(own: dict[str, Any], workers: list[tuple[int, int, Any]]) -> dict[str, Any]:
    """
    The first process's snapshot C{own} with every worker's: C{workers}
    lists each process (index 0 is the first), C{total} the sums of
    L{SUMMED}.  A worker that did not answer shows C{"error"}.
    """
    data = dict(own)
    entries = [{"index": 0, **own}]
    total = {name: int(own.get(name, 0)) for name in SUMMED}
    for index, pid, snap in workers:
        if snap is None:
            entries.append({"index": index, "pid": pid, "error": "no answer"})
            continue
        entries.append({"index": index, **snap})
        for name in SUMMED:
            total[name] += int(snap.get(name, 0))
    data["total"] = {"processes": len(entries), **total}
    data["workers"] = entries
    return data


class _Collector:
    def __init__(self, balancer: Any) -> None:
        self.balancer = balancer
        #: the workers' snapshots for the scrape in progress
        self.workers: list[tuple[int, int, Any]] = []

    def _sum(self, name: str, own: int) -> int:
        return own + sum(int(s.get(name, 0)) for _, _, s in self.workers if s)

    def collect(self) -> Any:
        b = self.balancer
        f = b.factory
        yield CounterMetricFamily(
            "balancer_accepted_connections", "Client connections accepted",
            value=self._sum("accepted", f.accepted),
        )
        yield CounterMetricFamily(
            "balancer_rejected_connections",
            "Client connections closed because no backend could be reached",
            value=self._sum("rejected", f.rejected),
        )
        yield CounterMetricFamily(
            "balancer_connect_failures", "Failed backend connection attempts",
            value=self._sum("connect_failures", f.connectFailures),
        )
        yield GaugeMetricFamily(
            "balancer_active_connections", "Client connections open now",
            value=self._sum("active", len(f.clients)),
        )
        yield GaugeMetricFamily(
            "balancer_proxy_timeout_seconds", "The proxy timeout (0: off)",
            value=f.proxyTimeout,
        )
        yield CounterMetricFamily(
            "balancer_proxy_timeout_closed_connections",
            "Proxied connections closed by the proxy timeout",
            value=self._sum("proxy_timeout_closed", f.idleSweep.expired),
        )
        yield CounterMetricFamily(
            "balancer_reloads", "Configuration reloads applied", value=b.reloads
        )
        yield CounterMetricFamily(
            "balancer_reload_failures", "Configuration reloads refused (kept the old one)",
            value=b.reloadFailures,
        )
        if b.discovery is not None:
            yield CounterMetricFamily(
                "balancer_discovery_errors", "Failed registry polls",
                value=b.discovery.errors,
            )
        if b.workers is not None:
            processes = GaugeMetricFamily(
                "balancer_worker_up", "1 if the worker answered this scrape",
                labels=["worker"],
            )
            processes.add_metric(["0"], 1)
            for index, _, snap in self.workers:
                processes.add_metric([str(index)], 1 if snap else 0)
            yield processes
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
        for peer in b.pool.allPeers():
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
    log = Logger()

    def __init__(self, balancer: Any) -> None:
        super().__init__()
        self.balancer = balancer
        self.collector = _Collector(balancer)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def _render(self, request: Any, workers: list[tuple[int, int, Any]]) -> bytes:
        path = request.path.rstrip(b"/")
        if path == b"/metrics":
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            self.collector.workers = workers
            try:
                return generate_latest(self.registry)
            finally:
                self.collector.workers = []
        if path in (b"", b"/status"):
            request.setHeader(b"content-type", b"application/json")
            data = snapshot(self.balancer)
            if self.balancer.workers is not None:
                data = combine(data, workers)
            return json.dumps(data, indent=2).encode() + b"\n"
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"not found: try / or /metrics\n"

    def render_GET(self, request: Any) -> Any:
        monitor = self.balancer.workers
        if monitor is None or request.path.rstrip(b"/") not in (b"", b"/status", b"/metrics"):
            return self._render(request, [])
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(workers: Any) -> None:
            if not gone:
                request.write(self._render(request, workers))
                request.finish()

        def failed(f: Any) -> None:
            self.log.failure("collecting the workers' status", f)
            answer([])

        monitor.collectStatus().addCallbacks(answer, failed)
        return server.NOT_DONE_YET


_NOT_ALLOWED_BODY = b"only GET and HEAD\n"
_NOT_ALLOWED = (
    b"HTTP/1.1 405 Method Not Allowed\r\n"
    b"Allow: GET, HEAD\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_NOT_ALLOWED_BODY), _NOT_ALLOWED_BODY)
)


class StatusChannel(http.HTTPChannel):
    """
    An HTTP channel for the status endpoint: one request per connection,
    headers within the site's C{headerTimeout}, and a C{405} straight from
    the request line for methods other than C{GET}/C{HEAD}.
    """

    method: bytes | None = None
    rejected = False
    _headerTimer: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.connectionOpened()
        self._headerTimer = self.callLater(self.site.headerTimeout, self._headersTooSlow)

    def _headersTooSlow(self) -> None:
        self._headerTimer = None
        self.rejected = True
        self.transport.abortConnection()

    def _stopHeaderTimer(self) -> None:
        timer, self._headerTimer = self._headerTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def dataReceived(self, data: bytes) -> None:
        if self.rejected:
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.rejected:
            return
        if self.method is None:
            if not line:
                return  # blank lines before a request are allowed
            self.method = line.split(b" ", 1)[0]
            if self.method not in (b"GET", b"HEAD"):
                self.rejected = True
                self._stopHeaderTimer()
                self.transport.pauseProducing()  # not a byte of the body
                self.transport.write(_NOT_ALLOWED)
                self.transport.loseConnection()
                return
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._stopHeaderTimer()
        super().allHeadersReceived()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def connectionLost(self, reason: Any) -> None:
        self._stopHeaderTimer()
        self.site.connectionClosed()
        super().connectionLost(reason)


class StatusSite(server.Site):
    """
    The status endpoint's site: quiet (scrapes would flood the log),
    without tracebacks, and with the limits of L{StatusChannel}.
    """

    protocol = StatusChannel  # type: ignore[assignment]
    noisy = False
    displayTracebacks = False

    def __init__(
        self,
        balancer: Any,
        maxConnections: int = MAX_CONNECTIONS,
        headerTimeout: float = HEADER_TIMEOUT,
        idleTimeout: float = IDLE_TIMEOUT,
    ) -> None:
        super().__init__(
            StatusResource(balancer), timeout=idleTimeout, reactor=balancer.reactor
        )
        self.maxConnections = maxConnections
        self.headerTimeout = headerTimeout
        self.openConnections = 0
        self.refused = 0

    def buildProtocol(self, addr: Any) -> Any:
        if self.openConnections >= self.maxConnections:
            self.refused += 1
            return None
        return super().buildProtocol(addr)

    def connectionOpened(self) -> None:
        self.openConnections += 1

    def connectionClosed(self) -> None:
        self.openConnections -= 1

    def log(self, request: Any) -> None:
        pass


def statusSite(balancer: Any) -> server.Site:
    return StatusSite(balancer)
