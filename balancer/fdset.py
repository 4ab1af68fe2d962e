"""
Descriptor bookkeeping of the lean data path through the reactor's public
C{IReactorFDSet} methods (the fallback of L{balancer._twisted.fdOps}, and
what runs on reactors other than epoll).
"""

from __future__ import annotations

from typing import Any


class PublicFDs:
    """
    Descriptor bookkeeping through the reactor's C{IReactorFDSet} methods.
    """

    def __init__(self, reactor: Any) -> None:
        self.addReader = reactor.addReader
        self.removeReader = reactor.removeReader
        self.addWriter = reactor.addWriter
        self.removeWriter = reactor.removeWriter

    def writerToReader(self, old: Any, new: Any) -> None:
        """
        The socket of writer C{old} is now read by C{new} (not written).
        """
        self.removeWriter(old)
        self.addReader(new)

    def forget(self, selectable: Any, reading: bool, writing: bool) -> None:
        """
        Stop watching C{selectable}, whose socket is closed next.
        """
        if reading:
            self.removeReader(selectable)
        if writing:
            self.removeWriter(selectable)
