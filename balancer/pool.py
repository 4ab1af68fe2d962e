"""
The set of backends, kept in step with the configuration and discovery.

Backends come from sources: C{"static"} (the C{--backend} lines, replaced
on every reload) and C{"redis"} (the cluster registry, replaced on every
poll).  A backend exists while any source lists it; a static line wins over
the registry for its parameters.  A backend that disappears from every
source is drained: it gets no new connections, its established ones go on
until they end or, with a drain timeout, until the deadline, when they are
closed; then it is forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

from balancer.checker import HealthChecker
from balancer.config import BackendSpec, BalancerConfig, normalizeAddress
from balancer.selection import Peer, Selector

SOURCE_PRIORITY = ("static", "redis")


@dataclass(frozen=True)
class CheckSettings:
    """
    The health-check part of a L{BalancerConfig} (compared on a reload:
    checkers restart only when it changed).
    """

    interval: float
    timeout: float
    rise: int
    fall: int
    send: bytes | None
    expect: bytes | None
    proxyProtocol: str | None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    @classmethod
    def fromConfig(cls, cfg: BalancerConfig) -> CheckSettings:
        return cls(
            cfg.checkInterval, cfg.checkTimeout, cfg.rise, cfg.fall, cfg.checkSend,
            cfg.checkExpect, cfg.proxyProtocol,
        )


class Pool:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        selector: Selector,
        checks: CheckSettings,
        drainTimeout: float = 0.0,
    ) -> None:
        self.reactor = reactor
        self.selector = selector
        self.checks = checks
        self.drainTimeout = drainTimeout
        self.sources: dict[str, dict[str, BackendSpec]] = {}
        self.peers: dict[str, Peer] = {}
        self.draining: dict[str, Peer] = {}
        self.factory: Any = None  # BalancerFactory, to close drained clients
        self._timers: dict[str, Any] = {}
        self.running = False

    # -- sources -------------------------------------------------------------

    def setSource(self, source: str, specs: list[BackendSpec]) -> None:
        """
        Replace everything C{source} says about backends and apply the
        difference.
        """
        self.sources[source] = {s.key: s for s in specs}
        self._sync()

    def _wanted(self) -> dict[str, tuple[BackendSpec, set[str]]]:
        wanted: dict[str, tuple[BackendSpec, set[str]]] = {}
        for source in sorted(self.sources, key=_priority):
            for key, spec in self.sources[source].items():
                prev = wanted.get(key)
                wanted[key] = (spec, (prev[1] if prev else set()) | {source})
        return wanted

    def _sync(self) -> None:
        wanted = self._wanted()
        for key, (spec, sources) in wanted.items():
            peer = self.peers.get(key)
            if peer is None:
                peer = self.draining.pop(key, None)
                if peer is not None:
                    self._undrain(peer)
                else:
                    peer = self._add(spec)
            self._update(peer, spec)
            peer.sources = sources
        for key in list(self.peers):
            if key not in wanted:
                self._drain(self.peers.pop(key))

    def _add(self, spec: BackendSpec) -> Peer:
        # weight and the passive-check parameters: _update, right after
        peer = Peer(
            spec.key, address=spec.address, weight=spec.weight,
            rise=self.checks.rise, fall=self.checks.fall, name=spec.name,
        )
        target = normalizeAddress(spec.address)
        if target is not None:
            peer.extra["tcp"] = target
        else:
            peer.extra["endpoint"] = clientFromString(self.reactor, spec.address)
        self.peers[peer.key] = peer
        self.selector.peers.append(peer)
        self.log.info("backend {peer} added (weight {w})", peer=peer.key, w=peer.weight)
        if self.running:
            self._startChecker(peer)
        return peer

    def _update(self, peer: Peer, spec: BackendSpec) -> None:
        if peer.weight != spec.weight:
            self.log.info(
                "backend {peer} weight {old} -> {new}",
                peer=peer.key, old=peer.weight, new=spec.weight,
            )
            peer.setWeight(spec.weight)
        peer.passive.maxFails = spec.maxFails
        peer.passive.failTimeout = spec.failTimeout
        peer.backup = spec.backup
        peer.down = spec.down
        if spec.name:
            peer.name = spec.name

    def _drain(self, peer: Peer) -> None:
        peer.draining = True
        self._stopChecker(peer)
        self.selector.peers.remove(peer)
        self.draining[peer.key] = peer
        self.log.info(
            "backend {peer} removed, draining {n} connections", peer=peer.key, n=peer.conns
        )
        if self.drainTimeout > 0 and peer.conns:
            self._timers[peer.key] = self.reactor.callLater(
                self.drainTimeout, self._drainDeadline, peer
            )
        self.connectionEnded(peer)

    def _undrain(self, peer: Peer) -> None:
        timer = self._timers.pop(peer.key, None)
        if timer is not None and timer.active():
            timer.cancel()
        peer.draining = False
        self.peers[peer.key] = peer
        self.selector.peers.append(peer)
        self.log.info("backend {peer} back from draining", peer=peer.key)
        if self.running:
            self._startChecker(peer)

    def _drainDeadline(self, peer: Peer) -> None:
        self._timers.pop(peer.key, None)
        if self.draining.get(peer.key) is not peer:
            return
        clients = [c for c in getattr(self.factory, "clients", ()) if c.peer is peer]
        self.log.info(
            "drain deadline for {peer}: closing {n} connections", peer=peer.key, n=len(clients)
        )
        for client in clients:
            client.close()

    def connectionEnded(self, peer: Peer) -> None:
        """
        Called when a proxied connection of C{peer} ended; forgets a drained
        peer once its last connection is gone.
        """
        if peer.draining and peer.conns <= 0 and self.draining.get(peer.key) is peer:
            del self.draining[peer.key]
            timer = self._timers.pop(peer.key, None)
            if timer is not None and timer.active():
                timer.cancel()
            self.log.info("backend {peer} drained", peer=peer.key)

    # -- health checks ---------------------------------------------------------

    def _startChecker(self, peer: Peer) -> None:
        if not self.checks.enabled or "checker" in peer.extra:
            return
        c = self.checks
        checker = HealthChecker(
            self.reactor, peer, c.interval, c.timeout, c.send, c.expect, c.proxyProtocol
        )
        peer.extra["checker"] = checker
        checker.start()

    def _stopChecker(self, peer: Peer) -> None:
        checker = peer.extra.pop("checker", None)
        if checker is not None:
            checker.stop()

    def setChecks(self, checks: CheckSettings) -> None:
        """
        New health check settings (a reload): restart the checkers if they
        changed.
        """
        if checks == self.checks:
            return
        self.checks = checks
        for peer in self.peers.values():
            peer.active.rise, peer.active.fall = checks.rise, checks.fall
            if self.running:
                self._stopChecker(peer)
                self._startChecker(peer)

    def start(self) -> None:
        self.running = True
        for peer in self.peers.values():
            self._startChecker(peer)

    def stop(self) -> None:
        self.running = False
        for peer in list(self.peers.values()) + list(self.draining.values()):
            self._stopChecker(peer)
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    # -- views -------------------------------------------------------------------

    def allPeers(self) -> list[Peer]:
        return list(self.peers.values()) + list(self.draining.values())


def _priority(source: str) -> int:
    # higher index = applied later = wins; static is the strongest
    try:
        return -SOURCE_PRIORITY.index(source)
    except ValueError:
        return -len(SOURCE_PRIORITY)
