"""
Client bytes that arrive before the backend connection is up, held and
sent first once it is (both data paths).
"""

from __future__ import annotations

# Bytes held from a client before its backend connection is up; beyond
# this the client is no longer read (Twisted's transport buffer size).
HOLD_LIMIT = 65536


class EarlyData:
    """
    The held bytes of one client.
    """

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> bool:
        """
        Hold C{data}; return whether more than L{HOLD_LIMIT} bytes are held
        (the client should no longer be read).
        """
        self.chunks.append(data)
        self.size += len(data)
        return self.size > HOLD_LIMIT

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks = []
        self.size = 0
        return data


def firstBytes(factory: object, client: object, local: object, held: EarlyData | None) -> bytes:
    """
    What goes to a backend first: the PROXY header (if configured) for
    C{client} connected to our address C{local}, then the held bytes.
    """
    data = factory.headerFor(client, local) if factory.proxyProtocol is not None else b""
    if held is not None:
        data += held.take()
    return data
