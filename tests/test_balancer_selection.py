"""
Unit tests for balancer.selection and balancer.health: pure logic, Clock only.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from balancer.health import ActiveHealth, PassiveHealth
from balancer.selection import Peer, Selector


def make(clock, algorithm="round-robin", **weights):
    sel = Selector(clock, algorithm)
    for name, w in weights.items():
        sel.peers.append(Peer(name, weight=w))
    return sel


def sequence(sel, n):
    return "".join(sel.pick().key for _ in range(n))


class SmoothRoundRobinTests(SynchronousTestCase):
    def test_nginx_sequence_5_1_1(self):
        """
        Weights 5,1,1 give nginx's documented smooth sequence a a b a c a a.
        """
        sel = make(Clock(), a=5, b=1, c=1)
        self.assertEqual(sequence(sel, 7), "aabacaa")
        # and the cycle repeats exactly
        self.assertEqual(sequence(sel, 7), "aabacaa")

    def test_equal_weights_rotate(self):
        sel = make(Clock(), a=1, b=1, c=1)
        self.assertEqual(sequence(sel, 6), "abcabc")

    def test_weights_proportion(self):
        sel = make(Clock(), a=3, b=2, c=1)
        seq = sequence(sel, 600)
        self.assertEqual((seq.count("a"), seq.count("b"), seq.count("c")), (300, 200, 100))

    def test_down_never_chosen(self):
        sel = make(Clock(), a=1, b=1)
        sel.peers[1].down = True
        self.assertEqual(sequence(sel, 4), "aaaa")

    def test_draining_never_chosen(self):
        sel = make(Clock(), a=1, b=1)
        sel.peers[0].draining = True
        self.assertEqual(sequence(sel, 3), "bbb")

    def test_backup_only_when_no_primary(self):
        clock = Clock()
        sel = make(clock, a=1, b=1)
        backup = Peer("z", weight=1, backup=True)
        sel.peers.append(backup)
        self.assertEqual(sequence(sel, 4), "abab")
        for p in sel.peers[:2]:
            p.active.record(False)
        self.assertEqual(sequence(sel, 2), "zz")
        sel.peers[0].active.record(True)
        sel.peers[0].active.record(True)
        self.assertEqual(sequence(sel, 2), "aa")

    def test_backup_down_means_none(self):
        sel = make(Clock(), a=1)
        sel.peers.append(Peer("z", backup=True, down=True))
        sel.peers[0].active.record(False)
        self.assertIsNone(sel.pick())
        self.assertEqual(sel.usable(), ([], []))

    def test_tried_excluded(self):
        sel = make(Clock(), a=1, b=1)
        a = sel.peers[0]
        self.assertEqual(sel.pick(tried={a}).key, "b")
        self.assertIsNone(sel.pick(tried=set(sel.peers)))

    def test_effective_weight_cut_and_recovers(self):
        """
        A failure cuts effectiveWeight by weight // maxFails; it grows back
        by one per selection round, as in nginx.
        """
        clock = Clock()
        sel = Selector(clock)
        a = Peer("a", weight=4, maxFails=2, failTimeout=10)
        b = Peer("b", weight=4, maxFails=2, failTimeout=10)
        sel.peers += [a, b]
        sel.failed(a)
        self.assertEqual(a.effectiveWeight, 2)
        self.assertEqual(a.passive.fails, 1)
        self.assertTrue(a.usable(clock.seconds()))
        sel.pick()
        self.assertEqual(a.effectiveWeight, 3)
        sel.pick()
        self.assertEqual(a.effectiveWeight, 4)
        sel.pick()
        self.assertEqual(a.effectiveWeight, 4)

    def test_effective_weight_never_negative(self):
        sel = Selector(Clock())
        a = Peer("a", weight=1, maxFails=1)
        sel.peers.append(a)
        sel.failed(a)
        sel.failed(a)
        self.assertEqual(a.effectiveWeight, 0)

    def test_set_weight(self):
        sel = make(Clock(), a=1, b=1)
        sel.peers[0].setWeight(3)
        seq = sequence(sel, 8)
        self.assertEqual(seq.count("a"), 6)


class LeastConnTests(SynchronousTestCase):
    def test_fewest_connections(self):
        sel = make(Clock(), "least-conn", a=1, b=1, c=1)
        sel.peers[0].conns = 5
        sel.peers[1].conns = 2
        sel.peers[2].conns = 3
        self.assertEqual(sel.pick().key, "b")

    def test_weighted(self):
        sel = make(Clock(), "least-conn", a=4, b=1)
        sel.peers[0].conns = 6  # 6/4 < 2/1
        sel.peers[1].conns = 2
        self.assertEqual(sel.pick().key, "a")

    def test_ties_round_robin(self):
        sel = make(Clock(), "least-conn", a=1, b=1)
        self.assertEqual(sequence(sel, 4), "abab")

    def test_spreads_as_connections_open(self):
        sel = make(Clock(), "least-conn", a=1, b=1, c=1)
        for _ in range(9):
            sel.pick().connectionStarted()
        self.assertEqual([p.conns for p in sel.peers], [3, 3, 3])


class LeastLoginsTests(SynchronousTestCase):
    def test_fewest_logins_plus_pending(self):
        sel = make(Clock(), "least-logins", a=1, b=1)
        sel.peers[0].setLogins(10)
        sel.peers[1].setLogins(7)
        picks = []
        for _ in range(5):
            p = sel.pick()
            p.connectionStarted()
            picks.append(p.key)
        # b gets the first three (7,8,9 < 10), then they alternate
        self.assertEqual("".join(picks[:3]), "bbb")
        self.assertEqual(sorted(picks[3:]), ["a", "b"])

    def test_registry_update_resets_pending(self):
        peer = Peer("a")
        peer.setLogins(3)
        peer.connectionStarted()
        self.assertEqual(peer.loadLogins(), 4)
        peer.setLogins(4)
        self.assertEqual(peer.loadLogins(), 4)

    def test_without_registry_uses_connections(self):
        peer = Peer("a")
        peer.conns = 2
        self.assertEqual(peer.loadLogins(), 2)


class PassiveHealthTests(SynchronousTestCase):
    """
    nginx's max_fails/fail_timeout state machine with an injected clock.
    """

    def test_disabled_after_max_fails_within_timeout(self):
        clock = Clock()
        sel = Selector(clock)
        a = Peer("a", maxFails=3, failTimeout=30)
        b = Peer("b")
        sel.peers += [a, b]
        sel.failed(a)
        clock.advance(1)
        sel.failed(a)
        self.assertTrue(a.usable(clock.seconds()))
        sel.failed(a)
        self.assertFalse(a.usable(clock.seconds()))
        clock.advance(29.9)
        self.assertEqual(sequence(sel, 3), "bbb")

    def test_one_probe_after_fail_timeout(self):
        clock = Clock()
        sel = Selector(clock)
        a = Peer("a", maxFails=1, failTimeout=10)
        b = Peer("b")
        sel.peers += [a, b]
        sel.failed(a)
        clock.advance(10.5)
        self.assertTrue(a.usable(clock.seconds()))
        picks = sequence(sel, 4)
        # a is probed exactly once, then closed again until the probe reports
        self.assertEqual(picks.count("a"), 1)
        self.assertFalse(a.usable(clock.seconds()))

    def test_probe_success_resets(self):
        clock = Clock()
        sel = Selector(clock)
        a = Peer("a", maxFails=1, failTimeout=10)
        sel.peers.append(a)
        sel.failed(a)
        clock.advance(11)
        self.assertIs(sel.pick(), a)
        sel.succeeded(a)
        self.assertEqual(a.passive.fails, 0)
        self.assertTrue(a.usable(clock.seconds()))

    def test_probe_failure_disables_again(self):
        clock = Clock()
        sel = Selector(clock)
        a = Peer("a", maxFails=1, failTimeout=10)
        sel.peers.append(a)
        sel.failed(a)
        clock.advance(11)
        self.assertIs(sel.pick(), a)
        sel.failed(a)
        self.assertIsNone(sel.pick())
        clock.advance(10.5)
        self.assertIs(sel.pick(), a)

    def test_success_without_probe_keeps_fails(self):
        """
        As nginx: a success only resets the count after a probe
        (accessed < checked), so two failures separated by successes of
        earlier connections still add up within fail_timeout.
        """
        h = PassiveHealth(maxFails=2, failTimeout=10)
        h.failed(1.0)
        h.succeeded()
        self.assertEqual(h.fails, 1)
        self.assertTrue(h.failed(2.0))
        self.assertFalse(h.available(5.0))
        self.assertTrue(h.available(12.5))

    def test_max_fails_zero_disables_accounting(self):
        h = PassiveHealth(maxFails=0, failTimeout=10)
        for _ in range(5):
            h.failed(1.0)
        self.assertTrue(h.available(1.0))


class ActiveHealthTests(SynchronousTestCase):
    """
    HAProxy's rise/fall counter.
    """

    def test_new_server_falls_at_first_failure(self):
        h = ActiveHealth(rise=2, fall=3)
        self.assertTrue(h.up)
        self.assertTrue(h.record(False))
        self.assertFalse(h.up)

    def test_fall_consecutive_failures(self):
        h = ActiveHealth(rise=2, fall=3)
        h.record(True)  # fully up
        self.assertEqual(h.health, 4)
        self.assertFalse(h.record(False))
        self.assertFalse(h.record(False))
        self.assertTrue(h.up)
        self.assertTrue(h.record(False))
        self.assertFalse(h.up)

    def test_success_restores_full_health(self):
        h = ActiveHealth(rise=2, fall=3)
        h.record(True)
        h.record(False)
        h.record(False)
        h.record(True)
        self.assertEqual(h.health, 4)
        h.record(False)
        h.record(False)
        self.assertTrue(h.up)

    def test_rise_consecutive_successes(self):
        h = ActiveHealth(rise=3, fall=1)
        h.record(False)
        self.assertFalse(h.up)
        self.assertFalse(h.record(True))
        self.assertFalse(h.record(True))
        self.assertTrue(h.record(True))
        self.assertTrue(h.up)

    def test_failure_between_successes_restarts_rise(self):
        h = ActiveHealth(rise=2, fall=2)
        h.record(False)
        h.record(True)
        h.record(False)
        h.record(True)
        self.assertFalse(h.up)
        h.record(True)
        self.assertTrue(h.up)

    def test_records_last_result(self):
        h = ActiveHealth()
        h.record(False, now=12.0, error="refused")
        self.assertEqual((h.lastResult, h.lastCheck, h.lastError), (False, 12.0, "refused"))

    def test_bad_parameters(self):
        self.assertRaises(ValueError, ActiveHealth, 0, 1)

    def test_peer_down_by_active_skipped(self):
        sel = make(Clock(), a=1, b=1)
        sel.peers[0].active.record(False)
        self.assertEqual(sel.peers[0].state, "down")
        self.assertEqual(sequence(sel, 3), "bbb")
