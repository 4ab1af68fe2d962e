"""
Credentials: the password (scrypt, throttled) and the session-resumption
token (no KDF, throttled the same way), password changes, and which token
each session logged in with (revoked by an explicit logout).

The throttle counts attempts in flight (L{LoginThrottle.admit}): parallel
guesses are throttled exactly like sequential ones, for passwords and
tokens alike.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from chatproto import messages as m
from chatproto.messages import RequestError
from chatproto.tasks import storeCall
from chatproto.throttle import LoginThrottle
from chatproto.tokens import TokenStoreUnavailable


class Credentials:
    """
    @param tokens: the L{chatproto.tokens.ITokenStore} (None: no tokens are
        issued, and a token login fails as a wrong one).
    @param names: uid -> name of users known to exist (the registry's
        cache: a token login whose name is known needs no query).
    @ivar throttleAccount, throttleAddress: failed logins per account, and
        per client address (behind a balancer that does not send the PROXY
        header every client shares its address, so that limit is looser).
    @ivar sessionTokens: session id -> the token of that login.
    """

    log = Logger()

    def __init__(self, store, hasher, clock, tokens=None, names=None) -> None:
        self.store = store
        self.hasher = hasher
        self.tokens = tokens
        self.names = {} if names is None else names
        self.throttleAccount = LoginThrottle(clock, allowed=5)
        self.throttleAddress = LoginThrottle(clock, allowed=50)
        self.sessionTokens: dict[str, str] = {}

    def admit(self, session, uid: int) -> None:
        """
        Count one credential check in flight for C{uid}, or refuse it
        (L{m.E_THROTTLED}): parallel guesses at one account are throttled
        exactly like sequential ones.

        The address counts finished failures only: behind a balancer
        without the PROXY header every client shares one address, and
        counting the checks in flight there would refuse the 51st of any
        burst of honest logins (a reconnect storm).  Parallel guesses at
        many accounts from one address are still bounded: by the KDF
        pool's queue for passwords, and by the failures counted as each
        (fast) token check ends.
        """
        wait = self.throttleAddress.retryAfter(session.peerHost)
        if wait <= 0:
            wait = self.throttleAccount.admit(uid)
        if wait > 0:
            raise RequestError(m.E_THROTTLED, f"too many failed logins; retry in {int(wait) + 1} s")

    async def checked(self, session, uid: int, check, what: str = "password"):
        """
        Run C{check()} (a coroutine returning its result, false when the
        credentials are wrong) under the throttle.

        @raise RequestError: L{m.E_THROTTLED} before, L{m.E_INVALID} after
            a wrong answer; a check that could not run (storage, KDF pool
            or token store unavailable) counts as no attempt.
        """
        self.admit(session, uid)
        try:
            result = await check()
        except BaseException:
            self.throttleAccount.abandon(uid)
            raise
        if not result:
            self.throttleAccount.finish(uid, ok=False)
            self.throttleAddress.failed(session.peerHost)
            self.log.info("failed login for {uid} from {peer}", uid=uid, peer=session.peerHost)
            raise RequestError(m.E_INVALID, f"id or {what} is invalid")
        # A success says nothing about the address's other attempts.
        self.throttleAccount.finish(uid, ok=True)
        return result

    async def verify(self, session, uid: int, password: str):
        """The L{User} C{uid} if C{password} is right; throttled."""

        async def check():
            user = await storeCall(self.store.getUser(uid))
            valid = await self.hasher.verify(password, user.passwordHash if user else None)
            return user if valid else None

        return await self.checked(session, uid, check)

    async def verifyToken(self, session, uid: int, token: str) -> tuple[str, str]:
        """C{(name, new token)} if C{token} resumes C{uid}; throttled like
        a password, and no KDF."""

        async def check():
            if self.tokens is None:
                return None
            try:
                fresh = await self.tokens.resume(uid, token)
            except TokenStoreUnavailable as e:
                self.log.warn("token store unavailable ({error}); resume of {uid} refused", error=e, uid=uid)
                raise RequestError(m.E_UNAVAILABLE, "cannot check tokens now; retry, or log in with the password")
            if fresh is None:
                return None
            name = fresh.name or self.names.get(uid)
            if name is None:
                user = await storeCall(self.store.getUser(uid))
                if user is None:
                    return None
                name = user.name
            return name, fresh

        return await self.checked(session, uid, check, "token")

    async def issueToken(self, uid: int, name: str | None = None) -> str | None:
        """A new token for C{uid} (None without a store, or when it is
        unavailable: the login goes on without one)."""
        if self.tokens is None:
            return None
        try:
            return await self.tokens.issue(uid, name)
        except TokenStoreUnavailable as e:
            self.log.warn("token store unavailable ({error}); login of {uid} gets no token", error=e, uid=uid)
            return None

    def revokeToken(self, uid: int, token: str) -> defer.Deferred:
        def failed(f):
            f.trap(TokenStoreUnavailable)
            self.log.warn("token store unavailable ({error}); token of {uid} not revoked", error=f.value, uid=uid)

        return self.tokens.revoke(uid, token).addErrback(failed)

    async def changePassword(self, session, old: str, new: str) -> dict:
        """PASSWD_MSG: check C{old} (throttled like a login), store C{new},
        revoke every token of the account; the ack carries a fresh token
        for this session."""
        uid = session.uid
        new = m.checkPassword(new)
        await self.verify(session, uid, old)
        passwordHash = await self.hasher.hash(new)
        await storeCall(self.store.setPassword(uid, passwordHash))
        self.log.info("[{uid}] changed the password", uid=uid)
        ack = {"msgid": m.PASSWD_MSG_ACK, "errno": m.OK, "id": uid}
        if self.tokens is None:
            return ack
        try:
            await self.tokens.revokeAll(uid)
        except TokenStoreUnavailable as e:
            self.log.warn("token store unavailable ({error}); tokens of {uid} not revoked", error=e, uid=uid)
            raise RequestError(
                m.E_UNAVAILABLE, "the password was changed but old tokens could not be revoked; send passwd again"
            ) from None
        self.sessionTokens.pop(session.sid, None)
        token = await self.issueToken(uid, session.name)
        if token is not None and session.uid == uid:
            self.sessionTokens[session.sid] = token
            ack["token"] = token
        return ack
