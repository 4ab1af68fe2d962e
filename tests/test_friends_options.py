"""
C{--friend-requests} (ini key C{friend-requests}) and the etc/ examples.
"""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial import unittest

from chatproto.service import ChatService
from chatproto.tap import Options, makeService
from tests.cluster_helpers import REPO


class FriendRequestsOptionTests(unittest.TestCase):
    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaultIsAuto(self):
        self.assertEqual(self.parse()["friend-requests"], "auto")

    def test_approve(self):
        options = self.parse("--friend-requests", "approve", "--port", "tcp:0", "--db", "sqlite::memory:")
        top = makeService(options, MemoryReactorClock())
        [chat] = [s for s in top if isinstance(s, ChatService)]
        self.assertTrue(chat.friendRequests.approve)
        self.assertIs(chat.loginFlow.friendRequests, chat.friendRequests)

    def test_badValue(self):
        e = self.assertRaises(usage.UsageError, self.parse, "--friend-requests", "yes")
        self.assertEqual(str(e), "--friend-requests must be auto or approve, not 'yes'")

    def test_iniKey(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[chat]\nfriend-requests = approve\n")
        self.assertEqual(self.parse("--config", path)["friend-requests"], "approve")
        self.assertEqual(self.parse("--config", path, "--friend-requests", "auto")["friend-requests"], "auto")

    def test_examples(self):
        """etc/chat.ini (one node, the tutorial and README session) uses
        auto; the cluster examples use approve."""
        modes = {}
        for name in ("chat.ini", "cluster-chat1.ini", "cluster-chat2.ini"):
            modes[name] = self.parse("--config", os.path.join(REPO, "etc", name))["friend-requests"]
        self.assertEqual(modes, {"chat.ini": "auto", "cluster-chat1.ini": "approve", "cluster-chat2.ini": "approve"})
