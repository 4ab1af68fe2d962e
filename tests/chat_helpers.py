"""
Helpers for protocol tests: a real ChatService over an in-memory SQLite
store (no threads), in-process presence and relay, a Clock, and clients on
StringTransports.
"""

from __future__ import annotations

import json
import sqlite3

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from chatproto.embedded import LocalPresence, LocalRelay
from chatproto.passwords import PasswordHasher
from chatproto.protocol import ChatProtocol
from chatproto.service import ChatService
from chatproto.sqlstore import ImmediatePool, SQLStore


class Client:
    """One connection on a StringTransport."""

    def __init__(self, protocol: ChatProtocol, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def sendRaw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def send(self, message: dict | str, end: bytes = b"\n") -> None:
        if isinstance(message, dict):
            data = json.dumps(message).encode()
        else:
            data = message.encode()
        self.sendRaw(data + end)

    def lines(self) -> list[str]:
        data = self.transport.value().decode("utf-8")
        self.transport.clear()
        return [line.rstrip("\r") for line in data.split("\n") if line]

    def replies(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]

    def reply(self) -> dict:
        [one] = self.replies()
        return one

    def request(self, message: dict) -> dict:
        """Send C{message}; return the single reply."""
        self.send(message)
        return self.reply()

    def disconnect(self) -> None:
        from twisted.internet.error import ConnectionDone

        self.protocol.connectionLost(Failure(ConnectionDone()))

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


class ControlledHasher(PasswordHasher):
    """Hashing whose completion the test decides (to interleave events)."""

    def __init__(self) -> None:
        super().__init__(None, n=16)
        self.waiting: list[defer.Deferred] = []
        self.hold = False

    def _run(self, f, *args):
        if not self.hold:
            return super()._run(f, *args)
        d = defer.Deferred()
        self.waiting.append(d)
        return d.addCallback(lambda _: f(*args))

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


class Harness:
    def __init__(self, onRelogin: str = "kick", maxLength: int = 1024, idleTimeout: float = 300) -> None:
        self.clock = Clock()
        self.connection = sqlite3.connect(":memory:")
        self.store = SQLStore(ImmediatePool(self.connection))
        self.presence = LocalPresence("test")
        self.hasher = ControlledHasher()
        self.service = ChatService(self.store, self.presence, LocalRelay(), self.hasher, self.clock, onRelogin)
        self.service.startService()
        self.maxLength = maxLength
        self.idleTimeout = idleTimeout
        self._ports = 0

    def connect(self, host: str = "10.0.0.1") -> Client:
        protocol = ChatProtocol(self.service, self.clock, self.maxLength, self.idleTimeout)
        self._ports += 1
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000 + self._ports))
        protocol.makeConnection(transport)
        return Client(protocol, transport)

    def register(self, name: str, password: str = "secret") -> int:
        # One address per registration: set-ups that register many users
        # stay clear of the per-address registration limit.
        self._registrations = getattr(self, "_registrations", 0) + 1
        n = self._registrations
        client = self.connect(f"10.1.{n // 250}.{n % 250 + 1}")
        reply = client.request({"msgid": 4, "name": name, "password": password})
        assert reply["errno"] == 0, reply
        client.disconnect()
        return reply["id"]

    def login(self, uid: int, password: str = "secret", host: str = "10.0.0.1") -> Client:
        client = self.connect(host)
        reply = client.request({"msgid": 1, "id": uid, "password": password})
        assert reply["errno"] == 0, reply
        return client


# --- real TCP ---------------------------------------------------------------

from twisted.application.internet import StreamServerEndpointService  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402


class LineClient(Protocol):
    """A TCP client that collects lines; C{await next()} takes the next one."""

    def __init__(self, reactor, end: bytes = b"\n") -> None:
        self.reactor = reactor
        self.end = end
        self.buffer = b""
        self.received: list[str] = []
        self.waiting: list[defer.Deferred] = []
        self.closed = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.received.append(line.rstrip(b"\r").decode("utf-8"))
        while self.waiting and self.received:
            self.waiting.pop(0).callback(self.received.pop(0))

    def connectionLost(self, reason) -> None:
        for d in self.waiting:
            d.errback(reason)
        self.waiting = []
        self.closed.callback(None)

    def send(self, message) -> None:
        data = json.dumps(message).encode() if isinstance(message, dict) else message.encode()
        self.transport.write(data + self.end)

    def nextLine(self, timeout: float = 5) -> defer.Deferred:
        if self.received:
            return defer.succeed(self.received.pop(0))
        d = defer.Deferred()
        self.waiting.append(d)
        return d.addTimeout(timeout, self.reactor)

    async def next(self, timeout: float = 5) -> dict:
        return json.loads(await self.nextLine(timeout))

    async def request(self, message: dict) -> dict:
        self.send(message)
        return await self.next()

    async def nextOf(self, msgid: int, timeout: float = 5) -> dict:
        """The next message with C{msgid}, skipping others (e.g. notices)."""
        while True:
            message = await self.next(timeout)
            if message.get("msgid") == msgid:
                return message


async def connectClient(reactor, port: int, host: str = "127.0.0.1", end: bytes = b"\n", tls=None) -> LineClient:
    from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
    from twisted.internet.protocol import Factory as _Factory

    if tls is None:
        endpoint = TCP4ClientEndpoint(reactor, host, port)
    else:
        endpoint = SSL4ClientEndpoint(reactor, host, port, tls)
    return await endpoint.connect(_Factory.forProtocol(lambda: LineClient(reactor, end)))


async def listeningPorts(top) -> list:
    """The listening ports of the stream server services in C{top}."""
    ports = []
    for child in top:
        if isinstance(child, StreamServerEndpointService):
            ports.append(await child._waitingForPort)
    # Until the chat service is ready, requests other than PING get errno 30.
    for child in top:
        if hasattr(child, "whenReady"):
            await child.whenReady()
    return ports


class TCPClientsMixin:
    """
    Real TCP chat clients for a trial C{TestCase}, each closed at cleanup;
    account C{name} has the password C{"pw-" + name}.
    """

    async def connectTo(self, port: int, **kw) -> LineClient:
        from twisted.internet import reactor

        client = await connectClient(reactor, port, **kw)
        self.addCleanup(self._closeClient, client)
        return client

    @staticmethod
    def _closeClient(client: LineClient):
        if client.transport.connected:
            client.transport.loseConnection()
            return client.closed

    async def registerAt(self, port: int, name: str) -> int:
        client = await self.connectTo(port)
        reply = await client.request({"msgid": 4, "name": name, "password": "pw-" + name})
        self.assertEqual(reply["errno"], 0, reply)
        client.transport.loseConnection()
        return reply["id"]

    async def loginAt(self, port: int, uid: int, name: str) -> tuple[LineClient, dict]:
        client = await self.connectTo(port)
        reply = await client.request({"msgid": 1, "id": uid, "password": "pw-" + name})
        self.assertEqual(reply.get("errno"), 0, reply)
        return client, reply
