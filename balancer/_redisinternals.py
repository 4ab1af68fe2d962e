"""
The one place the balancer touches txredisapi's private state (to be
folded into C{balancer/_twisted.py}): the reconnect back-off ceiling of a
lazy connection's factory, C{conn._factory.maxDelay}.

L{selfCheck} says whether the attribute is there; L{setMaxReconnectDelay}
sets it when it is and otherwise leaves txredisapi's default (a longer
ceiling, so Redis coming back is noticed later) with one log line.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

log = Logger()


def _factory(conn: Any) -> Any:
    return getattr(conn, "_factory", None)


def selfCheck(conn: Any) -> bool:
    """
    Whether C{conn} (a txredisapi lazy connection) has a reconnecting
    factory with a numeric C{maxDelay}.
    """
    factory = _factory(conn)
    return isinstance(getattr(factory, "maxDelay", None), (int, float))


def setMaxReconnectDelay(conn: Any, seconds: float) -> bool:
    """
    Cap the delay between reconnection attempts of C{conn} at C{seconds};
    returns whether it could.
    """
    if not selfCheck(conn):
        log.warn(
            "txredisapi has no _factory.maxDelay: keeping its default "
            "reconnect back-off"
        )
        return False
    _factory(conn).maxDelay = seconds
    return True
