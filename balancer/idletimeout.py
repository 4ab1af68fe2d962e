"""
nginx's C{proxy_timeout}: a proxied connection with no byte in either
direction for that long is closed.

One sweep per factory instead of a timer per connection: every quarter of
the timeout it compares each client's activity count (bytes or reads, kept
by the data path anyway) with the one it saw last; a connection seen idle
by four sweeps in a row is closed.  So a silent connection is closed after
between 1 and 1.25 times the timeout, and a connection costs nothing more
than one counter per read.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

# sweeps per timeout
STEPS = 4


class IdleSweep:
    """
    @ivar expired: connections closed by the proxy timeout so far.
    """

    log = Logger()

    def __init__(self, clock: Any, clients: set[Any], timeout: float) -> None:
        self.expired = 0
        self.clock = clock
        self.clients = clients
        self.timeout = timeout
        self.call: Any = None

    def setTimeout(self, timeout: float) -> None:
        if timeout != self.timeout:
            self.timeout = timeout
            self.stop()
            self.ensureRunning()

    def ensureRunning(self) -> None:
        """
        Sweep while there are clients (called for each new one).
        """
        if self.call is None and self.timeout > 0:
            self.call = self.clock.callLater(self.timeout / STEPS, self.sweep)

    def sweep(self) -> None:
        self.call = None
        expired = []
        for client in self.clients:
            mark = client.activity()
            if mark != client.idleMark:
                client.idleMark = mark
                client.idleSteps = 0
            elif client.peer is not None:
                client.idleSteps += 1
                if client.idleSteps == STEPS:
                    # once: a client whose close is under way is not
                    # closed (or counted) again
                    expired.append(client)
        self.expired += len(expired)
        for client in expired:
            self.log.info(
                "closing {client}: no data for {t}s (proxy timeout)",
                client=client.clientAddress(), t=self.timeout,
            )
            client.abort()
        if self.clients:
            self.ensureRunning()

    def stop(self) -> None:
        if self.call is not None:
            if self.call.active():
                self.call.cancel()
            self.call = None
