"""
Session-resumption tokens: log in again without the password KDF.

A successful password login is given a token (L{ITokenStore.issue}); a
later login presents the user id and that token instead of the password
(L{ITokenStore.resume}).  Implementations: L{MemoryTokenStore} here (a
single node, and the tests) and
L{chatproto.tokenstore_redis.RedisTokenStore} (a cluster: any server
accepts a token another one issued).

Decisions
=========

Secret
    C{secrets.token_urlsafe(32)}: 256 random bits as 43 characters of the
    URL-safe base64 alphabet (C{A-Z a-z 0-9 - _}: no C{:}, so it fits the
    text dialect's C{resume:ID:TOKEN}).

Only a hash is stored
    SHA-256 of the token, in hex.  A KDF is not needed: the token is 256
    random bits, so nobody can search for a preimage of a stolen hash.  A
    token is looked up by its hash under its account; no stored secret is
    ever compared with the presented one byte by byte, so timing can at
    most reveal something about a SHA-256 output of the attacker's own
    guess, which does not help to find a valid token.  L{MemoryTokenStore}
    goes further and compares the digest with each of the account's (at
    most 2 x C{maxPerUser}) digests with C{hmac.compare_digest}, without
    an early exit; the Redis store looks the digest up as a hash field.

Rotation on use, with a grace period
    A resume consumes the token and returns a new one, valid for C{ttl}
    (default 7 days) from then on: an account used at least once a week
    stays logged in (a sliding expiry), and a stolen token stops working
    once its owner resumes.  The old token stays valid for C{grace}
    seconds (default 60), so a resume whose reply was lost (connection
    dropped in the meantime) can be repeated with the old token; each such
    repeat revokes the successor the client never saw and issues another,
    so one login chain has one live token.  The grace period is not
    extended by repeats.

Revocation
    L{ITokenStore.revoke} (explicit logout) removes the token and any
    rotated predecessor still in its grace period that leads to it;
    L{ITokenStore.revokeAll} (password change) removes every token of the
    account.

Bounds
    At most C{maxPerUser} (default 20) live tokens per account: issuing
    one more drops the oldest.  Rotated tokens in their grace period are
    bounded the same way.  Expired entries are removed whenever the
    account's tokens are touched, and the whole record expires with its
    last token.

Malformed tokens (wrong type, length or alphabet) are rejected before any
hashing or storage access.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import os
from dataclasses import dataclass

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

#: Defaults (seconds, and tokens per account).
DEFAULT_TTL = 7 * 24 * 3600.0
DEFAULT_GRACE = 60.0
DEFAULT_MAX_PER_USER = 20

#: random bytes per token
TOKEN_BYTES = 32

_WELL_FORMED = re.compile(r"[A-Za-z0-9_-]{22,128}\Z")


class TokenStoreUnavailable(Exception):
    """The token storage (Redis) could not be reached: tell the user to
    try again (or to log in with the password), not that the token is
    wrong."""


def _freshTokens():
    # What secrets.token_urlsafe(TOKEN_BYTES) returns, from one os.urandom
    # call per TOKEN_BATCH tokens (a reconnect storm issues thousands a
    # second, and each system call hands the GIL over).
    while True:
        pool = os.urandom(TOKEN_BYTES * TOKEN_BATCH)
        for start in range(0, len(pool), TOKEN_BYTES):
            yield base64.urlsafe_b64encode(pool[start : start + TOKEN_BYTES]).rstrip(b"=").decode("ascii")


TOKEN_BATCH = 64
_tokens = _freshTokens()


def newToken() -> str:
    """A fresh token: 256 random bits (C{os.urandom}), URL-safe text."""
    return next(_tokens)


def wellFormed(token) -> bool:
    """Whether C{token} could be a token at all (a str of 22 to 128
    characters of the URL-safe base64 alphabet)."""
    return isinstance(token, str) and _WELL_FORMED.match(token) is not None


def tokenHash(token: str) -> str:
    """What is stored for C{token}: its SHA-256, in hex."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def validUid(uid) -> bool:
    """Whether C{uid} is an account id (a positive int, not a bool)."""
    return type(uid) is int and uid > 0


class Resumed(str):
    """
    The new token L{ITokenStore.resume} returns (a L{str}), carrying the
    account's name when L{ITokenStore.issue} was given one (else None):
    a server that resumes a session another server started needs no
    database query for the name.
    """

    name: str | None = None

    def __new__(cls, token: str, name: str | None = None):
        self = super().__new__(cls, token)
        self.name = name
        return self


class ITokenStore(Interface):
    """
    Session-resumption tokens of accounts.  Every method returns a
    Deferred; storage failures fail it with L{TokenStoreUnavailable}.
    """

    ttl = Attribute("seconds a token stays valid after it is issued")
    grace = Attribute("seconds a rotated token keeps working")
    maxPerUser = Attribute("live tokens per account, at most")

    def issue(uid, name=None):
        """
        A new token for account C{uid} (after a password login).  Drops
        the account's oldest live token if it has C{maxPerUser} already.
        C{name}, the account's name (names never change), is kept with the
        account's tokens and given back by L{resume}.

        @rtype: L{Deferred} firing with the token (L{str})
        """

    def resume(uid, token):
        """
        Log in with C{token}: if it is a live token of C{uid} (or a token
        rotated less than C{grace} seconds ago), consume it and return its
        successor.

        @rtype: L{Deferred} firing with the new token (a L{Resumed}), or L{None} if
            C{token} is wrong, malformed, expired, revoked, or belongs to
            another account
        """

    def revoke(uid, token):
        """
        Revoke C{token} (explicit logout), and a rotated predecessor in its
        grace period that leads to it.

        @rtype: L{Deferred} firing with whether C{token} was a token of
            C{uid}
        """

    def revokeAll(uid):
        """
        Revoke every token of C{uid} (password change).

        @rtype: L{Deferred} firing with how many live or rotated tokens
            were removed
        """


@dataclass
class _Entry:
    expires: float
    seq: int
    rotated: bool = False
    next: str = ""


class _Account:
    __slots__ = ("seq", "entries", "name")

    def __init__(self) -> None:
        self.seq = 0
        self.name: str | None = None
        self.entries: dict[str, _Entry] = {}


def checkSettings(ttl: float, grace: float, maxPerUser: int) -> None:
    """The settings every token store takes, checked once for both."""
    if maxPerUser < 1 or ttl <= 0 or grace < 0:
        raise ValueError("ttl must be > 0, grace >= 0 and maxPerUser >= 1")


@implementer(ITokenStore)
class MemoryTokenStore:
    """
    Tokens in a dict, for one node (and the tests): the same rules as
    L{chatproto.tokenstore_redis.RedisTokenStore}.

    @param clock: an L{IReactorTime} (its C{seconds()} is the time).
    @ivar accounts: uid to its record; holds only hashes.
    """

    def __init__(
        self, clock, ttl: float = DEFAULT_TTL, grace: float = DEFAULT_GRACE, maxPerUser: int = DEFAULT_MAX_PER_USER
    ) -> None:
        checkSettings(ttl, grace, maxPerUser)
        self.clock = clock
        self.ttl = ttl
        self.grace = grace
        self.maxPerUser = maxPerUser
        self.accounts: dict[int, _Account] = {}

    # --- helpers -------------------------------------------------------------

    def _load(self, uid: int, now: float) -> _Account | None:
        account = self.accounts.get(uid)
        if account is None:
            return None
        for h in [h for h, e in account.entries.items() if e.expires <= now]:
            del account.entries[h]
        return account

    def _settle(self, uid: int, account: _Account) -> None:
        if not account.entries:
            del self.accounts[uid]

    def _bound(self, account: _Account, rotated: bool, room: int) -> None:
        """Drop the oldest entries of one kind until C{room} more fit."""
        kind = sorted((e.seq, h) for h, e in account.entries.items() if e.rotated == rotated)
        for _, h in kind[: max(0, len(kind) - (self.maxPerUser - room))]:
            del account.entries[h]

    def _add(self, account: _Account, h: str, now: float) -> None:
        self._bound(account, False, 1)
        account.seq += 1
        account.entries[h] = _Entry(now + self.ttl, account.seq)

    def prune(self) -> int:
        """
        Forget every expired token, of accounts not touched since too (the
        Redis store's keys expire by themselves; here, call this now and
        then, e.g. hourly from a C{LoopingCall} on the same clock).
        Returns how many entries were removed.
        """
        now = self.clock.seconds()
        removed = 0
        for uid in list(self.accounts):
            account = self.accounts[uid]
            before = len(account.entries)
            self._load(uid, now)
            removed += before - len(account.entries)
            self._settle(uid, account)
        return removed

    # --- ITokenStore ---------------------------------------------------------

    def issue(self, uid: int, name: str | None = None) -> defer.Deferred:
        if not validUid(uid):
            return defer.fail(ValueError(f"bad uid {uid!r}"))
        token = newToken()
        now = self.clock.seconds()
        account = self._load(uid, now) or self.accounts.setdefault(uid, _Account())
        if name:
            account.name = name
        self._add(account, tokenHash(token), now)
        return defer.succeed(token)

    def resume(self, uid, token) -> defer.Deferred:
        if not (validUid(uid) and wellFormed(token)):
            return defer.succeed(None)
        now = self.clock.seconds()
        account = self._load(uid, now)
        if account is None:
            return defer.succeed(None)
        h = tokenHash(token)
        entry = None
        for k, e in account.entries.items():  # all of them: no early exit
            if hmac.compare_digest(k, h):
                entry = e
        if entry is None:
            self._settle(uid, account)
            return defer.succeed(None)
        successor = newToken()
        sh = tokenHash(successor)
        if entry.rotated:
            account.entries.pop(entry.next, None)
        else:
            self._bound(account, True, 1)
            entry.rotated = True
            entry.expires = min(entry.expires, now + self.grace)
        entry.next = sh
        if entry.expires <= now:  # grace 0: gone at once
            del account.entries[h]
        self._add(account, sh, now)
        return defer.succeed(Resumed(successor, account.name))

    def revoke(self, uid, token) -> defer.Deferred:
        if not (validUid(uid) and wellFormed(token)):
            return defer.succeed(False)
        account = self._load(uid, self.clock.seconds())
        if account is None:
            return defer.succeed(False)
        h = tokenHash(token)
        found = account.entries.pop(h, None) is not None
        for k in [k for k, e in account.entries.items() if e.rotated and e.next == h]:
            del account.entries[k]
        self._settle(uid, account)
        return defer.succeed(found)

    def revokeAll(self, uid) -> defer.Deferred:
        if not validUid(uid):
            return defer.succeed(0)
        account = self._load(uid, self.clock.seconds())
        if account is None:
            return defer.succeed(0)
        del self.accounts[uid]
        return defer.succeed(len(account.entries))
