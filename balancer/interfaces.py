"""
The seams of the balancer's data path.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IProxiedClient(Interface):
    """
    A client connection being proxied, on either data path: a
    L{balancer.sides.ServerSide} (Twisted transports) or a
    L{balancer.lean.LeanClient} (raw sockets).  This is what
    L{balancer.proxy.BalancerFactory.dispatch}, L{balancer.attempt.Attempt},
    the idle sweep and the pool's drain deadline use.
    """

    factory = Attribute("the L{balancer.proxy.BalancerFactory}")
    lean = Attribute("C{True} for the raw-socket path")
    closed = Attribute("the client has gone away")
    peer = Attribute("the backend L{balancer.selection.Peer} once connected, else C{None}")
    tried = Attribute("peers tried so far while connecting (a set), C{None} once connected")
    attempt = Attribute("the L{balancer.attempt.Attempt} in progress, or C{None}")
    idleMark = Attribute("activity count at the last idle sweep")
    idleSteps = Attribute("idle sweeps in a row that saw no activity")

    def clientAddress():
        """
        The client's Twisted address.
        """

    def backendConnected(backend, peer):
        """
        The attempt to C{peer} succeeded: C{backend} is a
        L{balancer.sides.BackendSide} (Twisted path) or the connected socket
        (lean path).
        """

    def activity():
        """
        A number that changes whenever a byte is read in either direction.
        """

    def close():
        """
        Close both connections once what is buffered is sent.
        """

    def abort():
        """
        Close both connections now.
        """
