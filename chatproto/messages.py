"""
Message ids, error numbers and request validation, free of I/O.

Ids 1-10 are the muduo "ClusterChatServer" tutorial's, with its shapes kept
where its client reads them.  Everything from 11 on is this server's addition
(see C{docs/protocol.md}).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

# --- the tutorial's ids ----------------------------------------------------
LOGIN_MSG = 1
LOGIN_MSG_ACK = 2
LOGINOUT_MSG = 3
REG_MSG = 4
REG_MSG_ACK = 5
ONE_CHAT_MSG = 6
ADD_FRIEND_MSG = 7
CREATE_GROUP_MSG = 8
ADD_GROUP_MSG = 9
GROUP_CHAT_MSG = 10

# --- additions -------------------------------------------------------------
LOGINOUT_MSG_ACK = 11
ONE_CHAT_MSG_ACK = 12
ADD_FRIEND_MSG_ACK = 13
CREATE_GROUP_MSG_ACK = 14
ADD_GROUP_MSG_ACK = 15
GROUP_CHAT_MSG_ACK = 16
FRIEND_LIST_MSG = 17
FRIEND_LIST_MSG_ACK = 18
GROUP_LIST_MSG = 19
GROUP_LIST_MSG_ACK = 20
PING_MSG = 21
PONG_MSG = 22
KICK_NOTICE = 23
FRIEND_STATE_NOTICE = 24
FRIEND_ADDED_NOTICE = 25
#: an acking client confirms pushed chats (chatproto.acks); no reply
PUSH_ACK = 26
PASSWD_MSG = 27
PASSWD_MSG_ACK = 28
# friend requests (--friend-requests approve; chatproto.friendrequests)
FRIEND_REQUEST_NOTICE = 29
FRIEND_REPLY_MSG = 30
FRIEND_REPLY_MSG_ACK = 31
ERROR_MSG = 99

# --- error numbers ---------------------------------------------------------
OK = 0
#: LOGIN: bad id or password; REG: name taken or invalid (the tutorial's 1).
E_INVALID = 1
#: LOGIN: the account is online elsewhere (--on-relogin reject).
E_ONLINE = 2
#: LOGIN: too many failed attempts, retry later.
E_THROTTLED = 3
#: LOGIN: this connection is logged in already.
E_ALREADY_LOGGED_IN = 4
E_BAD_JSON = 10
E_BAD_MESSAGE = 11
E_UNKNOWN_MSGID = 12
E_BAD_FIELD = 13
E_NOT_LOGGED_IN = 14
E_LINE_TOO_LONG = 15
E_UNKNOWN_COMMAND = 16
E_NO_SUCH_USER = 20
E_NO_SUCH_GROUP = 21
E_NOT_A_MEMBER = 22
E_NAME_TAKEN = 23
E_SELF = 24
E_MAILBOX_FULL = 25
E_UNAVAILABLE = 30
E_INTERNAL = 31
#: FRIEND_REPLY: no unanswered, unexpired request from that user.
E_NO_SUCH_REQUEST = 27
#: ADD_FRIEND: too many of your friend requests are pending.
E_TOO_MANY_REQUESTS = 28

ERROR_TEXT = {
    E_INVALID: "invalid",
    E_ONLINE: "this account is online elsewhere",
    E_THROTTLED: "too many failed logins",
    E_ALREADY_LOGGED_IN: "already logged in; log out first",
    E_BAD_JSON: "malformed JSON",
    E_BAD_MESSAGE: "a message is a JSON object with an integer msgid",
    E_UNKNOWN_MSGID: "unknown msgid",
    E_BAD_FIELD: "missing or mistyped field",
    E_NOT_LOGGED_IN: "log in first",
    E_LINE_TOO_LONG: "line too long; it was discarded",
    E_UNKNOWN_COMMAND: "unknown command; type help",
    E_NO_SUCH_USER: "no such user",
    E_NO_SUCH_GROUP: "no such group",
    E_NOT_A_MEMBER: "you are not a member of this group",
    E_NAME_TAKEN: "name taken",
    E_SELF: "you cannot do that to yourself",
    E_MAILBOX_FULL: "the recipient's mailbox is full",
    E_UNAVAILABLE: "service temporarily unavailable; try again",
    E_INTERNAL: "internal error",
    E_NO_SUCH_REQUEST: "no pending friend request from this user",
    E_TOO_MANY_REQUESTS: "too many pending friend requests",
}


class RequestError(Exception):
    """A request that cannot be carried out; becomes an error reply."""

    #: The msgid and seq of the request, when it could be parsed that far.
    reqmsgid = None
    seq = None

    def __init__(self, errno: int, errmsg: str | None = None) -> None:
        self.errno = errno
        self.errmsg = errmsg or ERROR_TEXT.get(errno, "error")
        super().__init__(self.errno, self.errmsg)


# --- request schema --------------------------------------------------------

MAX_NAME = 32
MAX_PASSWORD = 128
MAX_GROUPNAME = 64
MAX_GROUPDESC = 512

#: Ids (and every other integer field) are signed 64-bit, as the stores keep them.
MIN_ID = -(2**63)
MAX_ID = 2**63 - 1

#: Deepest nesting of JSON arrays and objects accepted in a request; a
#: request needs 1 (scalar C{seq} values) and json's parser recurses.
MAX_JSON_DEPTH = 32


@dataclass(frozen=True)
class Spec:
    """What one request msgid needs."""

    name: str
    ack: int
    fields: tuple[tuple[str, type, bool], ...]  # (field, type, required)
    needsLogin: bool = True


SPECS: dict[int, Spec] = {
    # Exactly one of password and token (checked by validate).
    LOGIN_MSG: Spec(
        "login",
        LOGIN_MSG_ACK,
        (("id", int, True), ("password", str, False), ("token", str, False), ("ack", None, False)),
        False,
    ),
    LOGINOUT_MSG: Spec("logout", LOGINOUT_MSG_ACK, ()),
    REG_MSG: Spec("register", REG_MSG_ACK, (("name", str, True), ("password", str, True)), False),
    # A field typed None is passed on as sent (None when absent): its handler
    # checks it (cid, mids: chatproto.acks).
    ONE_CHAT_MSG: Spec("chat", ONE_CHAT_MSG_ACK, (("toid", int, True), ("msg", str, True), ("cid", None, False))),
    ADD_FRIEND_MSG: Spec("addfriend", ADD_FRIEND_MSG_ACK, (("friendid", int, True),)),
    CREATE_GROUP_MSG: Spec(
        "creategroup",
        CREATE_GROUP_MSG_ACK,
        (("groupname", str, True), ("groupdesc", str, False)),
    ),
    ADD_GROUP_MSG: Spec("addgroup", ADD_GROUP_MSG_ACK, (("groupid", int, True),)),
    GROUP_CHAT_MSG: Spec(
        "groupchat", GROUP_CHAT_MSG_ACK, (("groupid", int, True), ("msg", str, True), ("cid", None, False))
    ),
    FRIEND_LIST_MSG: Spec("friends", FRIEND_LIST_MSG_ACK, ()),
    GROUP_LIST_MSG: Spec("groups", GROUP_LIST_MSG_ACK, ()),
    PING_MSG: Spec("ping", PONG_MSG, (), False),
    PASSWD_MSG: Spec("passwd", PASSWD_MSG_ACK, (("old", str, True), ("new", str, True))),
    FRIEND_REPLY_MSG: Spec("friendreply", FRIEND_REPLY_MSG_ACK, (("id", int, True), ("accept", bool, True))),
    # No reply; its errors are ERROR_MSGs.
    PUSH_ACK: Spec("pushack", ERROR_MSG, (("mids", None, True),)),
}

_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false"}


@dataclass
class Request:
    """A validated request, whichever dialect it came in."""

    msgid: int
    spec: Spec
    args: dict[str, Any]
    #: Echoed in the reply when the client sent one (any JSON scalar).
    seq: Any = None


def validate(msgid: Any, fields: dict[str, Any], seq: Any = None) -> Request:
    """
    Check C{fields} against the spec of C{msgid}.

    @raise RequestError: with L{E_UNKNOWN_MSGID} or L{E_BAD_FIELD}.
    """
    spec = SPECS.get(msgid)
    if spec is None:
        raise RequestError(E_UNKNOWN_MSGID, f"unknown msgid {msgid}")
    args = {}
    for field, kind, required in spec.fields:
        value = fields.get(field)
        if value is None:
            if required:
                raise RequestError(E_BAD_FIELD, f"missing field {field!r}")
            if kind is None:
                continue
            value = kind()
        elif kind is None:
            pass
        # bool is an int subclass; true/false is never an id.
        elif type(value) is not kind:
            raise RequestError(
                E_BAD_FIELD, f"field {field!r} must be {_TYPE_NAMES[kind]}"
            )
        elif kind is int and not MIN_ID <= value <= MAX_ID:
            raise RequestError(E_BAD_FIELD, f"field {field!r} is out of range (signed 64-bit)")
        elif kind is str and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate (\ud800) decodes but cannot be sent on.
                raise RequestError(E_BAD_FIELD, f"field {field!r} is not valid Unicode") from None
        args[field] = value
    if msgid == LOGIN_MSG:
        _oneCredential(fields, args)
    return Request(msgid, spec, args, seq)


def _oneCredential(fields: dict[str, Any], args: dict[str, Any]) -> None:
    """A login has exactly one of C{password} and C{token}; C{args} keeps
    only the one given."""
    given = [name for name in ("password", "token") if fields.get(name) is not None]
    if len(given) != 1:
        raise RequestError(E_BAD_FIELD, "a login needs exactly one of 'password' and 'token'")
    del args["token" if given[0] == "password" else "password"]


def parseJSON(line: bytes) -> Request:
    """
    Parse one JSON-dialect line.

    @raise RequestError: with L{E_BAD_JSON}, L{E_BAD_MESSAGE},
        L{E_UNKNOWN_MSGID} or L{E_BAD_FIELD}.
    """
    if line.count(b"{") + line.count(b"[") > MAX_JSON_DEPTH:
        # Only then is the nesting measured (brackets in strings not counted).
        checkDepth(line)
    try:
        # Lines are UTF-8 (RFC 8259); decoding first skips json's sniffing.
        obj = _decode(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(E_BAD_JSON, f"malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError(E_BAD_MESSAGE)
    msgid = obj.get("msgid")
    if type(msgid) is not int:
        raise RequestError(E_BAD_MESSAGE)
    seq = obj.get("seq")
    if isinstance(seq, (dict, list)):
        seq = None
    elif isinstance(seq, str) and not seq.isascii():
        try:
            seq.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate could not be echoed back.
            raise RequestError(E_BAD_FIELD, "field 'seq' is not valid Unicode") from None
    try:
        return validate(msgid, obj, seq)
    except RequestError as e:
        e.reqmsgid, e.seq = msgid, seq
        raise


_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def checkDepth(line: bytes, limit: int | None = None) -> None:
    """
    Refuse JSON nested deeper than C{limit} (default L{MAX_JSON_DEPTH})
    before it reaches json's recursive parser.

    @raise RequestError: with L{E_BAD_JSON}.
    """
    limit = MAX_JSON_DEPTH if limit is None else limit
    depth = 0
    for token in _TOKENS.findall(line):
        if token in (b"{", b"["):
            depth += 1
            if depth > limit:
                raise RequestError(E_BAD_JSON, f"malformed JSON: nested deeper than {limit}")
        elif token in (b"}", b"]"):
            depth -= 1


def _refuseConstant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finiteFloat(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


#: Unicode categories no name may hold: controls (C0, DEL, C1), format
#: characters (bidi overrides, zero-width joiners...), surrogates, and the
#: line and paragraph separators.
_NAME_REFUSED = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))


def checkName(name: str, limit: int = MAX_NAME, what: str = "name") -> str:
    """
    Normalise (Unicode NFC, surrounding white space removed) and check a
    user or group name, so that one name has one spelling: C{"\u00e9"}
    and C{"e\u0301"} are the same name.

    @raise RequestError: with L{E_INVALID} and a reason.
    """
    name = unicodedata.normalize("NFC", name).strip()
    if not name:
        raise RequestError(E_INVALID, f"{what} must not be empty")
    if len(name) > limit:
        raise RequestError(E_INVALID, f"{what} is longer than {limit} characters")
    if ":" in name:
        raise RequestError(E_INVALID, f"{what} must not contain ':'")
    if not name.isprintable():
        for c in name:
            if c != " " and unicodedata.category(c) in _NAME_REFUSED:
                raise RequestError(
                    E_INVALID, f"{what} must not contain control, format or separator characters (U+{ord(c):04X})"
                )
    return name


def checkPassword(password: str) -> str:
    if not password:
        raise RequestError(E_INVALID, "password must not be empty")
    if len(password) > MAX_PASSWORD:
        raise RequestError(E_INVALID, f"password is longer than {MAX_PASSWORD} characters")
    return password


# NaN and Infinity are not JSON: refused on input (E_BAD_JSON), never written.
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_decode = json.JSONDecoder(parse_constant=_refuseConstant, parse_float=_finiteFloat).decode
_string = json.encoder.encode_basestring  # the C version when available


def encode(message: dict) -> bytes:
    """The JSON-dialect line for C{message}, without terminator."""
    return _encoder.encode(message).encode("utf-8")


def encodeChat(message: dict) -> bytes:
    """L{encode} for a L{ONE_CHAT_MSG}, the hot path, by hand."""
    return (
        '{"msgid":6,"id":%d,"name":%s,"toid":%d,"msg":%s,"time":"%s","mid":"%s"}'
        % (
            message["id"],
            _string(message["name"]),
            message["toid"],
            _string(message["msg"]),
            message["time"],
            message["mid"],
        )
    ).encode("utf-8")


class Reply(dict):
    """A reply that carries its JSON encoding, made once."""

    __slots__ = ("line",)

    def __init__(self, line: bytes, **fields) -> None:
        super().__init__(fields)
        self.line = line


def error(errno: int, errmsg: str | None = None, reqmsgid: int | None = None, seq: Any = None) -> dict:
    """An L{ERROR_MSG}."""
    out = {"msgid": ERROR_MSG, "errno": errno, "errmsg": errmsg or ERROR_TEXT.get(errno, "error")}
    if reqmsgid is not None:
        out["reqmsgid"] = reqmsgid
    if seq is not None:
        out["seq"] = seq
    return out
