"""
End to end on the embedded default: the service tree that `twistd chat`
builds (chatproto.tap), listening on real TCP (and TLS) ports, with real
socket clients.
"""

import ipaddress
import json
import os

from twisted.internet import reactor
from twisted.internet import ssl as tssl
from twisted.trial import unittest

from chatproto import messages as m
from chatproto.tap import Options, makeService
from tests.chat_helpers import TCPClientsMixin, listeningPorts


def selfSignedPEM(directory):
    """Write a throwaway key and certificate for 127.0.0.1; return paths."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    keyPath, certPath = directory + "/key.pem", directory + "/cert.pem"
    with open(keyPath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open(certPath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


class EndToEndTests(TCPClientsMixin, unittest.TestCase):
    extraArgs: list = []

    async def setUp(self):
        options = Options()
        options.parseOptions(
            ["--port", "tcp:0:interface=127.0.0.1", "--db", f"sqlite:{self.mktemp()}.sqlite3", "--scrypt-n", "16"]
            + self.extraArgs
        )
        self.top = makeService(options, reactor)
        self.top.startService()
        self.addCleanup(self.top.stopService)
        self.ports = [p.getHost().port for p in await listeningPorts(self.top)]
        self.port = self.ports[0]

    def connect(self, **kw):
        return self.connectTo(kw.pop("port", self.port), **kw)

    def register(self, name):
        return self.registerAt(self.port, name)

    def login(self, uid, name):
        return self.loginAt(self.port, uid, name)


class EmbeddedChatTests(EndToEndTests):
    async def test_twoUsersChat(self):
        a, b = await self.register("alice"), await self.register("bob")
        alice, _ = await self.login(a, "alice")
        bob, _ = await self.login(b, "bob")
        ack = await alice.request({"msgid": 6, "toid": b, "msg": "hello bob"})
        self.assertEqual(ack["state"], "delivered")
        msg = await bob.next()
        self.assertEqual((msg["msgid"], msg["id"], msg["name"], msg["msg"]), (6, a, "alice", "hello bob"))
        bob.send({"msgid": 6, "toid": a, "msg": "hi alice"})
        self.assertEqual((await alice.nextOf(m.ONE_CHAT_MSG))["msg"], "hi alice")

    async def test_offlineDelivery(self):
        a, b = await self.register("alice"), await self.register("bob")
        alice, _ = await self.login(a, "alice")
        for i in range(20):
            alice.send({"msgid": 6, "toid": b, "msg": f"m{i}"})
        for i in range(20):
            self.assertEqual((await alice.next())["state"], "stored")
        bob, login = await self.login(b, "bob")
        self.assertEqual([json.loads(x)["msg"] for x in login["offlinemsg"]], [f"m{i}" for i in range(20)])

    async def test_groups(self):
        a, b, c = await self.register("alice"), await self.register("bob"), await self.register("carol")
        alice, _ = await self.login(a, "alice")
        gid = (await alice.request({"msgid": 8, "groupname": "g", "groupdesc": "d"}))["groupid"]
        bob, _ = await self.login(b, "bob")
        carol, _ = await self.login(c, "carol")
        for client in (bob, carol):
            self.assertEqual((await client.request({"msgid": 9, "groupid": gid}))["errno"], 0)
        ack = await alice.request({"msgid": 10, "groupid": gid, "msg": "all of you"})
        self.assertEqual((ack["delivered"], ack["stored"]), (2, 0))
        for client in (bob, carol):
            self.assertEqual((await client.nextOf(m.GROUP_CHAT_MSG))["msg"], "all of you")

    async def test_kick(self):
        a = await self.register("alice")
        old, _ = await self.login(a, "alice")
        new, _ = await self.login(a, "alice")
        notice = await old.next()
        self.assertEqual(notice["msgid"], m.KICK_NOTICE)
        await old.closed
        self.assertEqual(await new.request({"msgid": 21}), {"msgid": m.PONG_MSG})

    async def test_tutorialClientFraming(self):
        """The C++ client ends messages with NUL, no newline, and may have
        two in one segment."""
        a = await self.register("alice")
        client = await self.connect(end=b"\0")
        client.send({"msgid": 1, "id": a, "password": "pw-alice"})
        client.transport.write(b'{"msgid":21}\0{"msgid":21}\0')
        self.assertEqual((await client.next())["msgid"], m.LOGIN_MSG_ACK)
        self.assertEqual([await client.next(), await client.next()], [{"msgid": 22}, {"msgid": 22}])

    async def test_textSession(self):
        client = await self.connect(end=b"\r\n")
        client.send("register:dave:pw")
        self.assertEqual(await client.nextLine(), "registered: your id is 1; log in with login:1:PASSWORD")
        client.send("login:1:pw")
        self.assertRegex(await client.nextLine(), r"^login ok: you are \[1\]dave \(resume with resume:1:[A-Za-z0-9_-]{43}\)$")
        client.send("PING")
        self.assertEqual(await client.nextLine(), "PONG")

    async def test_halfClosingClientGetsEveryReply(self):
        """
        C{printf '...' | nc -N}: the requests, then a half-close; every
        reply comes back before the server closes the connection.
        """
        client = await self.connect(end=b"\n")
        client.transport.write(b"PING\nregister:erin:pw\nhelp\nPING")
        client.transport.loseWriteConnection()
        await client.closed
        self.assertEqual(client.received[:2], ["PONG", "registered: your id is 1; log in with login:1:PASSWORD"])
        self.assertEqual(client.received[2], "commands:")
        self.assertEqual(client.received[-1], "PONG")

    async def test_slowReaderLosesNothing(self):
        """
        A client that stops reading is logged out once the server holds too
        much unsent for it; every message sent to it is either read by it
        afterwards or waiting offline at its next login.
        """
        from chatproto.service import ChatService

        [chat] = [s for s in self.top if isinstance(s, ChatService)]
        a, b = await self.register("alice"), await self.register("bob")
        alice, _ = await self.login(a, "alice")
        bob, _ = await self.login(b, "bob")
        chat.sessions[b].maxPendingOutput = 64 * 1024
        # Every message must be accounted for: no mailbox cap here.
        chat.store.mailboxMaxMessages = chat.store.mailboxMaxBytes = None
        bob.transport.pauseProducing()
        total, text = 12000, "x" * 1000
        states = {"delivered": 0, "stored": 0}
        for start in range(0, total, 1000):
            alice.transport.write(
                b"".join(
                    json.dumps({"msgid": 6, "toid": b, "msg": f"{i} {text}"}).encode() + b"\n"
                    for i in range(start, start + 1000)
                )
            )
            for _ in range(1000):
                ack = await alice.nextOf(m.ONE_CHAT_MSG_ACK)
                states[ack["state"]] += 1
        self.assertGreater(states["stored"], 0)
        self.assertNotIn(b, chat.sessions)
        bob.transport.resumeProducing()
        await bob.closed
        read = [json.loads(line) for line in bob.received]
        self.assertEqual(read[-1]["msgid"], m.KICK_NOTICE)
        readIds = [int(x["msg"].split()[0]) for x in read if x["msgid"] == m.ONE_CHAT_MSG]
        bob, login = await self.login(b, "bob")
        storedIds = [int(json.loads(x)["msg"].split()[0]) for x in login["offlinemsg"]]
        # The login reply carries the first page; the rest follow it.
        while len(readIds) + len(storedIds) < total:
            storedIds.append(int((await bob.nextOf(m.ONE_CHAT_MSG))["msg"].split()[0]))
        self.assertEqual(len(readIds), states["delivered"])
        self.assertEqual(sorted(readIds + storedIds), list(range(total)))

    async def test_shutdownEndsSessionsCleanly(self):
        a = await self.register("alice")
        alice, _ = await self.login(a, "alice")
        await self.top.stopService()
        notice = await alice.next()
        self.assertEqual(notice, {"msgid": m.KICK_NOTICE, "reason": "server shutting down"})
        await alice.closed


class TLSTests(EndToEndTests):
    async def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        keyPath, certPath = selfSignedPEM(directory)
        self.extraArgs = ["--port", f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"]
        self.certPath = certPath
        await super().setUp()

    async def test_chatOverTLS(self):
        with open(self.certPath) as f:
            authority = tssl.Certificate.loadPEM(f.read())
        options = tssl.optionsForClientTLS("127.0.0.1", authority)
        client = await self.connect(port=self.ports[1], tls=options)
        reply = await client.request({"msgid": 4, "name": "tls-user", "password": "pw"})
        self.assertEqual(reply["errno"], 0)
        self.assertEqual(await client.request({"msgid": 21}), {"msgid": 22})


class ProxyProtocolTests(EndToEndTests):
    extraArgs = ["--port", "haproxy:tcp:0:interface=127.0.0.1"]

    async def test_realClientAddressFromProxyHeader(self):
        from chatproto.service import ChatService

        [chat] = [s for s in self.top if isinstance(s, ChatService)]
        client = await self.connect(port=self.ports[1])
        client.transport.write(b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 6000\r\n")
        self.assertEqual(await client.request({"msgid": 21}), {"msgid": 22})
        [session] = chat.connections.values()
        self.assertEqual(session.peerHost, "203.0.113.7")

    async def test_halfCloseBehindProxyHeader(self):
        """
        Behind the balancer (PROXY header, then the client's EOF passed on
        as a half-close) every reply still comes back before the close.
        """
        client = await self.connect(port=self.ports[1])
        client.transport.write(b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 6000\r\nPING\nregister:fay:pw\nPING")
        client.transport.loseWriteConnection()
        await client.closed
        self.assertEqual(
            client.received, ["PONG", "registered: your id is 1; log in with login:1:PASSWORD", "PONG"]
        )
