"""
Backend selection, pure logic with an injected clock.

L{Peer} is one backend's runtime state; L{Selector} picks a peer for a new
client connection with one of the algorithms:

 - C{round-robin}: nginx's smooth weighted round-robin, exactly as in
   C{ngx_stream_upstream_get_peer}: every usable peer adds its
   C{effectiveWeight} to C{currentWeight}, the largest wins and has the
   total subtracted.  C{effectiveWeight} is cut by C{weight // maxFails}
   on every failure and grows back by one per selection round.
 - C{least-conn}: nginx's C{least_conn}: fewest active connections relative
   to weight, ties broken by smooth weighted round-robin.
 - C{least-logins}: fewest logged-in users (from the cluster registry) plus
   the connections sent there since the registry was last read, relative to
   weight; ties broken by smooth weighted round-robin.

Backup peers are used only when no primary peer is usable; C{down} and
draining peers are never chosen; a peer whose first health check has not
completed is chosen only when no peer has passed one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

from balancer.health import ActiveHealth, PassiveHealth

ALGORITHMS = ("round-robin", "least-conn", "least-logins")


class Peer:
    """
    One backend and everything the balancer knows about it.

    @ivar key: identity of the backend (its address string).
    @ivar address: what to connect to: C{host:port} or a client endpoint
        string.
    @ivar sources: where this peer came from (C{"static"}, C{"redis"}).
    """

    def __init__(
        self,
        key: str,
        address: str | None = None,
        weight: int = 1,
        maxFails: int = 1,
        failTimeout: float = 10.0,
        backup: bool = False,
        down: bool = False,
        rise: int = 2,
        fall: int = 3,
        name: str = "",
    ) -> None:
        self.key = key
        self.address = address if address is not None else key
        self.name = name or key
        self.weight = max(1, int(weight))
        self.effectiveWeight = self.weight
        self.currentWeight = 0
        self.backup = backup
        self.down = down
        self.passive = PassiveHealth(maxFails, failTimeout)
        self.active = ActiveHealth(rise, fall)
        self.draining = False
        self.sources: set[str] = set()
        # counters
        self.conns = 0
        self.total = 0
        self.failures = 0
        # least-logins
        self.logins: int | None = None
        self.pending = 0
        # arbitrary per-peer objects owned by the I/O layer (endpoint, checker)
        self.extra: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Peer {self.key} w={self.weight} state={self.state}>"

    def setWeight(self, weight: int) -> None:
        weight = max(1, int(weight))
        if weight != self.weight:
            self.weight = weight
            self.effectiveWeight = min(self.effectiveWeight, weight)
            if self.effectiveWeight <= 0:
                self.effectiveWeight = weight

    def usable(self, now: float) -> bool:
        if self.down or self.draining:
            return False
        active = self.active
        if active.health < active.rise:  # not active.up (inlined: called per connection)
            return False
        return self.passive.available(now)

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        if self.down:
            return "disabled"
        if not self.active.up:
            return "down"
        return "up"

    def loadLogins(self) -> int:
        """
        The least-logins load estimate: registry logins plus connections sent
        since, or active connections when the registry says nothing.
        """
        if self.logins is None:
            return self.conns
        return self.logins + self.pending

    def setLogins(self, logins: int | None) -> None:
        self.logins = logins
        self.pending = 0

    # accounting called by the proxy

    def connectionStarted(self) -> None:
        self.conns += 1
        self.pending += 1

    def connectionEnded(self) -> None:
        self.conns -= 1


def _smoothPick(candidates: Iterable[Peer]) -> Peer | None:
    """
    One round of nginx's smooth weighted round-robin over C{candidates}.
    """
    best: Peer | None = None
    total = 0
    for peer in candidates:
        peer.currentWeight += peer.effectiveWeight
        total += peer.effectiveWeight
        if peer.effectiveWeight < peer.weight:
            peer.effectiveWeight += 1
        if best is None or peer.currentWeight > best.currentWeight:
            best = peer
    if best is not None:
        best.currentWeight -= total
    return best


def _leastPick(candidates: list[Peer], load: Callable[[Peer], int]) -> Peer | None:
    """
    nginx's least_conn: the smallest C{load/weight}; ties broken by smooth
    weighted round-robin among the tied peers.
    """
    best: Peer | None = None
    tied: list[Peer] = []
    for peer in candidates:
        if best is None or load(peer) * best.weight < load(best) * peer.weight:
            best = peer
            tied = [peer]
        elif load(peer) * best.weight == load(best) * peer.weight:
            tied.append(peer)
    if len(tied) > 1:
        return _smoothPick(tied)
    return best


class Selector:
    """
    Chooses a backend among C{peers} with the configured algorithm.

    @param clock: an C{IReactorTime}; only C{seconds()} is used.
    """

    def __init__(self, clock: Any, algorithm: str = "round-robin") -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        self.clock = clock
        self.algorithm = algorithm
        self.peers: list[Peer] = []

    def usable(
        self, tried: Collection[Peer] = (), now: float | None = None
    ) -> tuple[list[Peer], list[Peer]]:
        if now is None:
            now = self.clock.seconds()
        primary: list[Peer] = []
        backup: list[Peer] = []
        for peer in self.peers:
            if peer in tried or not peer.usable(now):
                continue
            if peer.backup:
                backup.append(peer)
            else:
                primary.append(peer)
        return _checkedFirst(primary), _checkedFirst(backup) if backup else backup

    def pick(self, tried: Collection[Peer] = ()) -> Peer | None:
        """
        Choose a peer not in C{tried}, or C{None} if none is usable.
        """
        now = self.clock.seconds()
        primary, backup = self.usable(tried, now)
        candidates = primary or backup
        if not candidates:
            return None
        if self.algorithm == "round-robin":
            best = _smoothPick(candidates)
        elif self.algorithm == "least-conn":
            best = _leastPick(candidates, _conns)
        else:
            best = _leastPick(candidates, Peer.loadLogins)
        assert best is not None
        best.passive.picked(now)
        return best

    def failed(self, peer: Peer) -> None:
        """
        A connection attempt to C{peer} failed (nginx's C{free_peer} with
        C{NGX_PEER_FAILED}).
        """
        peer.failures += 1
        peer.passive.failed(self.clock.seconds())
        if peer.passive.maxFails:
            peer.effectiveWeight -= peer.weight // peer.passive.maxFails
        if peer.effectiveWeight < 0:
            peer.effectiveWeight = 0

    def succeeded(self, peer: Peer) -> None:
        peer.passive.succeeded()


def _checkedFirst(peers: list[Peer]) -> list[Peer]:
    """
    C{peers} without those whose first health check has not completed,
    unless no peer has completed one (checks off, or all just added): a
    backend not yet checked is not preferred over one that passed.
    """
    unchecked = 0
    for peer in peers:
        if peer.active.lastResult is None:
            unchecked += 1
    if unchecked == 0 or unchecked == len(peers):
        return peers
    return [p for p in peers if p.active.lastResult is not None]


def _conns(peer: Peer) -> int:
    return peer.conns
