"""
Password hashing with a slow salted KDF (scrypt), off the reactor thread.

Stored form: C{scrypt$N$r$p$salt$hash} with salt and hash in base64.

With a L{chatproto.kdfpool.KDFPool} the work runs in that dedicated,
bounded pool; when its queue is full L{PasswordHasher.hash} and
L{PasswordHasher.verify} fail at once with a L{RequestError}
(C{E_UNAVAILABLE}, "busy, retry").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from twisted.internet import defer


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


class PasswordHasher:
    """
    @param reactor: runs the KDF in its thread pool (None: run it inline,
        for tests of pure protocol logic).
    @param n: scrypt's cost; 2**14 takes about 50 ms and 16 MiB.
    @param pool: the L{chatproto.kdfpool.KDFPool} to run the KDF in
        (default, given a reactor: a new one sized to the cores, queue 64).
    """

    def __init__(self, reactor=None, n: int = 2**14, r: int = 8, p: int = 1, pool=None) -> None:
        self._reactor = reactor
        self.n, self.r, self.p = n, r, p
        if pool is None and reactor is not None:
            from chatproto.kdfpool import KDFPool

            pool = KDFPool(reactor)
        self.pool = pool
        # Verifying against this when an account does not exist costs the
        # same time as a real check, so timing does not tell which ids exist.
        self._dummy = self._hashSync("not a password")

    def _run(self, f, *args) -> defer.Deferred:
        if self.pool is None:
            return defer.maybeDeferred(f, *args)
        return self.pool.run(f, *args)

    def _hashSync(self, password: str) -> str:
        salt = os.urandom(16)
        digest = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=self.n, r=self.r, p=self.p, maxmem=2**27, dklen=32
        )
        return f"scrypt${self.n}${self.r}${self.p}${_b64(salt)}${_b64(digest)}"

    @staticmethod
    def _verifySync(password: str, stored: str) -> bool:
        try:
            scheme, n, r, p, salt, digest = stored.split("$")
            if scheme != "scrypt":
                return False
            expected = base64.b64decode(digest)
            actual = hashlib.scrypt(
                password.encode("utf-8"),
                salt=base64.b64decode(salt),
                n=int(n),
                r=int(r),
                p=int(p),
                maxmem=2**27,
                dklen=len(expected),
            )
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(actual, expected)

    def hash(self, password: str) -> defer.Deferred:
        """@rtype: Deferred firing with the stored form of C{password}."""
        return self._run(self._hashSync, password)

    def verify(self, password: str, stored: str | None) -> defer.Deferred:
        """
        @param stored: the stored form, or None for an unknown account (the
            check then runs against a dummy and fails).
        @rtype: Deferred firing with a bool.
        """
        if stored is None:
            return self._run(self._verifySync, password, self._dummy).addCallback(lambda _: False)
        return self._run(self._verifySync, password, stored)
