"""
The PROXY protocol header (v1 text, v2 binary) a balancer sends first to
a backend, saying where the client connected from.
"""

from __future__ import annotations

import struct
from ipaddress import ip_address
from typing import Any

_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _ipPort(addr: Any) -> tuple[str, int] | None:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is None or port is None:
        return None
    try:
        ip_address(host)
    except ValueError:
        return None
    return host, port


def _toV6(host: str) -> str:
    a = ip_address(host)
    return host if a.version == 6 else f"::ffff:{host}"


def proxyHeader(version: str, source: Any, destination: Any) -> bytes:
    """
    A PROXY protocol header (C{"v1"} text or C{"v2"} binary) saying the
    connection came from C{source} to C{destination} (Twisted addresses).
    """
    src, dst = _ipPort(source), _ipPort(destination)
    if src and dst and ip_address(src[0]).version != ip_address(dst[0]).version:
        # mixed families: map the v4 one into v6
        src = (_toV6(src[0]), src[1])
        dst = (_toV6(dst[0]), dst[1])
    if version == "v1":
        if not (src and dst):
            return b"PROXY UNKNOWN\r\n"
        fam = "TCP6" if ":" in src[0] else "TCP4"
        return f"PROXY {fam} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")
    if not (src and dst):
        # LOCAL command, no address
        return _V2_SIGNATURE + b"\x20\x00\x00\x00"
    s, d = ip_address(src[0]), ip_address(dst[0])
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    fam = b"\x11" if s.version == 4 else b"\x21"
    return _V2_SIGNATURE + b"\x21" + fam + struct.pack("!H", len(body)) + body

