"""
The graceful stop of a chat server (SIGTERM, C{twistd}'s service tree
stopping): requests already read are answered, every session gets its
goodbye before its user is logged out, nothing held is dropped.

The listeners close first (they are stopped before the chat service).
Then L{GracefulStop.run}:

 1. stops reading from every session (requests already read stay queued
    and are carried out);
 2. stops waiting for confirmations of chats sent from here (they are
    stored offline at once, L{chatproto.acks}), and tells the cluster this server is going (C{announceStop} of the
    presence, when it has one): from now on its users count as offline
    everywhere, so other servers store what they send them and their
    logins elsewhere succeed at once, even with C{--on-relogin reject};
 3. waits until every request read so far is answered (at most
    C{timeout} seconds);
 4. kicks every session (the kick notice, then the connection closes),
    and only then logs its user out (friends are told) and stores offline
    what was held for it while it logged in;
 5. waits (at most C{timeout} seconds more) until what was written to the
    sessions has left this process, and for the background tasks (logouts,
    offline stores, notices).

The relay, presence and store are stopped by the service afterwards.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger

from chatproto.output import pendingBytes

REASON = "server shutting down"


class GracefulStop:
    """
    @param service: the L{chatproto.service.ChatService}.
    @ivar stopping: set once L{run} started.
    """

    log = Logger()

    #: seconds to wait for unanswered requests, then for unsent output
    timeout = 10.0
    #: how often unsent output is looked at while waiting for it
    pollInterval = 0.05

    def __init__(self, service) -> None:
        self.service = service
        self.clock = service.clock
        self.stopping = False
        #: Deferreds of the requests being carried out
        self.inflight: set[defer.Deferred] = set()

    def track(self, d: defer.Deferred) -> defer.Deferred:
        """A request being carried out: L{run} waits for it."""
        self.inflight.add(d)

        def done(result):
            self.inflight.discard(d)
            return result

        return d.addBoth(done)

    async def run(self) -> None:
        self.stopping = True
        service = self.service
        registry = service.registry
        for session in list(registry.connections.values()):
            transport = getattr(session, "transport", None)
            if transport is not None and session.connected:
                transport.pauseProducing()
        # Chats waiting for a confirmation are stored offline now, and
        # those still to come are not waited for.
        service.confirmations.stopWaiting()
        announce = getattr(service.presence, "announceStop", None)
        if announce is not None:
            try:
                await announce()
            except Exception:
                self.log.failure("announcing the stop of {name}", name=service.serverName)
        deadline = self.clock.seconds() + self.timeout
        await self._answerInflight(deadline)
        sessions = list(registry.connections.values())
        for session in sessions:
            session.kick(REASON)
        for session in sessions:
            service.delivery.storeHeld(session)
            if session.uid is not None:
                service.tasks.track(defer.Deferred.fromCoroutine(service.logout(session)))
        await self._flushed(sessions, deadline + self.timeout)
        if service.tasks.pending:
            await service.tasks.wait()
        # Confirmations for the servers that sent to these sessions.
        service.confirmations.flush()

    async def _answerInflight(self, deadline: float) -> None:
        # A request's Deferred fires before the session's own callbacks
        # (reply, next queued line) have run; a DeferredList made now fires
        # after them, by which time the next queued request is tracked.
        while self.inflight:
            waiting = defer.DeferredList(list(self.inflight), consumeErrors=True)
            if not await self._within(waiting, deadline):
                self.log.warn("{n} requests still unanswered at shutdown", n=len(self.inflight))
                return

    async def _within(self, d: defer.Deferred, deadline: float) -> bool:
        """Whether C{d} fires before C{deadline} (it is not cancelled)."""
        gate = defer.Deferred()

        def fire(value):
            if not gate.called:
                gate.callback(value)

        timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), fire, False)
        d.addBoth(lambda result: (fire(True), result)[1])
        fired = await gate
        if timer.active():
            timer.cancel()
        return fired

    async def _flushed(self, sessions, deadline: float) -> None:
        """Until what was written to C{sessions} has left this process
        (the kernel sends it even once the reactor has stopped), or
        C{deadline}: then the rest is aborted."""
        transports = [getattr(s, "transport", None) for s in sessions]
        transports = [t for t in transports if t is not None]
        while self.clock.seconds() < deadline:
            if not any(getattr(t, "connected", False) and pendingBytes(t) for t in transports):
                return
            await task.deferLater(self.clock, self.pollInterval, lambda: None)
        for transport in transports:
            if getattr(transport, "connected", False):
                transport.abortConnection()
