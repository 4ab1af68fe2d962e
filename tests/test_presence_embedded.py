"""The presence/relay contract for the in-process (single node) implementation."""

from twisted.internet import defer
from twisted.trial import unittest

from chatproto.embedded import LocalPresence, LocalRelay
from tests.contract_presence import PresenceContract


class EmbeddedPresenceTests(PresenceContract, unittest.TestCase):
    def makePresence(self, serverName, receiver):
        presence = LocalPresence(serverName)
        relay = LocalRelay()
        presence.start(lambda: len(presence._owners))
        relay.start(receiver)
        return defer.succeed((presence, relay))
