"""
The plain-text dialect for a person in telnet or nc, free of I/O.

Commands use the tutorial client's syntax (C{login:ID:PASSWORD}, ...);
replies and incoming messages are rendered as readable lines.
"""

from __future__ import annotations

import json
import unicodedata

from chatproto import messages as m
from chatproto.messages import Request, RequestError, validate

HELP = """\
commands:
  help                        this text
  register:NAME:PASSWORD      create an account; the reply tells your id
  login:ID:PASSWORD           log in
  resume:ID:TOKEN             log in again with the token a login gave
  passwd:OLD:NEW              change your password (ends every other resume token)
  chat:FRIENDID:MESSAGE       send MESSAGE to user FRIENDID
  addfriend:FRIENDID          make FRIENDID your friend (mutual; or ask them,
                              when the server wants consent)
  requests                    list your friends and the requests to answer
  accept:ID                   accept ID's friend request
  refuse:ID                   refuse ID's friend request (ID is not told)
  creategroup:NAME:DESC       create a group (you become its creator)
  addgroup:GROUPID            join a group
  groupchat:GROUPID:MESSAGE   send MESSAGE to a group
  friends                     list your friends and who is online
  groups                      list your groups and their members
  loginout                    log out (stay connected)
  quit                        log out and disconnect
  PING                        answers PONG"""

#: command -> (msgid, ((field, type), ...)); the fields are ':'-separated
_COMMANDS: dict[str, tuple[int, tuple[tuple[str, type], ...]]] = {
    "register": (m.REG_MSG, (("name", str), ("password", str))),
    "login": (m.LOGIN_MSG, (("id", int), ("password", str))),
    "resume": (m.LOGIN_MSG, (("id", int), ("token", str))),
    "passwd": (m.PASSWD_MSG, (("old", str), ("new", str))),
    "chat": (m.ONE_CHAT_MSG, (("toid", int), ("msg", str))),
    "addfriend": (m.ADD_FRIEND_MSG, (("friendid", int),)),
    "creategroup": (m.CREATE_GROUP_MSG, (("groupname", str), ("groupdesc", str))),
    "addgroup": (m.ADD_GROUP_MSG, (("groupid", int),)),
    "groupchat": (m.GROUP_CHAT_MSG, (("groupid", int), ("msg", str))),
    "friends": (m.FRIEND_LIST_MSG, ()),
    "groups": (m.GROUP_LIST_MSG, ()),
    "loginout": (m.LOGINOUT_MSG, ()),
    "logout": (m.LOGINOUT_MSG, ()),
    "ping": (m.PING_MSG, ()),
    "requests": (m.FRIEND_LIST_MSG, ()),
    "accept": (m.FRIEND_REPLY_MSG, (("id", int),)),
    "refuse": (m.FRIEND_REPLY_MSG, (("id", int),)),
}

#: Fields a command sets by itself.
_PRESETS = {"accept": {"accept": True}, "refuse": {"accept": False}}

#: Commands answered by the protocol itself, not the service.
HELP_COMMAND = "help"
QUIT_COMMAND = "quit"


def parseText(line: str) -> Request | str:
    """
    Parse one text-dialect line into a L{Request}, or return
    L{HELP_COMMAND} / L{QUIT_COMMAND}.

    The last field takes the rest of the line, so a message or a password
    may contain C{:}.

    @raise RequestError: with L{m.E_UNKNOWN_COMMAND} or L{m.E_BAD_FIELD}.
    """
    command, _, rest = line.strip().partition(":")
    command = command.strip().lower()
    if command in (HELP_COMMAND, QUIT_COMMAND) and not rest:
        return command
    entry = _COMMANDS.get(command)
    if entry is None:
        raise RequestError(m.E_UNKNOWN_COMMAND, f"unknown command {command!r}; type help")
    msgid, fields = entry
    parts = rest.split(":", len(fields) - 1) if fields and rest else []
    if not fields and rest:
        raise RequestError(m.E_BAD_FIELD, f"{command} takes no arguments")
    args = {}
    for i, (field, kind) in enumerate(fields):
        if i >= len(parts):
            if msgid == m.CREATE_GROUP_MSG and field == "groupdesc":
                continue
            raise RequestError(m.E_BAD_FIELD, f"usage: {_usage(command)}")
        value = parts[i]
        if kind is int:
            try:
                value = int(value.strip())
            except ValueError:
                raise RequestError(m.E_BAD_FIELD, f"{field} must be a number; usage: {_usage(command)}") from None
        args[field] = value
    args.update(_PRESETS.get(command, ()))
    return validate(msgid, args)


def _usage(command: str) -> str:
    """The command's syntax as C{help} shows it, e.g. C{chat:TOID:MSG}."""
    return ":".join([command] + [field.upper() for field, _ in _COMMANDS[command][1]])


def _user(entry: dict) -> str:
    line = f"[{entry['id']}]{entry['name']} {entry.get('state', '')}".rstrip()
    if entry.get("role"):
        line += f" ({entry['role']})"
    return line


def _loads(x):
    return json.loads(x) if isinstance(x, str) else x


#: Characters shown escaped: controls (C0, DEL, C1: CR, LF, NEL among
#: them), format characters (bidi overrides, zero-width...), surrogates and
#: the line and paragraph separators (U+2028, U+2029).
_HIDDEN = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text: str) -> str:
    """
    C{text} with every character that could break or disguise a line
    replaced by a visible escape (C{\\n}, C{\\r}, C{\\t}, C{\\u202e}...),
    so that nothing a user sent can start a line of its own or reorder one.
    """
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c == " " or unicodedata.category(c) not in _HIDDEN:
            out.append(c)
        elif c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


def render(msg: dict) -> list[str]:
    """
    The text lines a person sees for the outgoing C{msg}.  Whatever users
    supplied (messages, names, group descriptions, offline messages) is
    passed through L{visible}: each rendered line stays one line.
    """
    return [visible(line) for line in _render(msg)]


def _render(msg: dict) -> list[str]:
    msgid = msg.get("msgid")
    errno = msg.get("errno", 0)
    if msgid == m.ONE_CHAT_MSG:
        return [f"{msg['time']} [{msg['id']}]{msg['name']} said: {msg['msg']}"]
    if msgid == m.GROUP_CHAT_MSG:
        return [f"{msg['time']} group[{msg['groupid']}] [{msg['id']}]{msg['name']} said: {msg['msg']}"]
    if msgid == m.PONG_MSG:
        return ["PONG"]
    if msgid == m.ERROR_MSG or errno:
        return [f"error {errno}: {msg.get('errmsg', '')}"]
    if msgid == m.LOGIN_MSG_ACK:
        lines = [f"login ok: you are [{msg['id']}]{msg['name']}"]
        if msg.get("token"):
            # On the same line: the session reads as before, and the
            # person can copy the command to log in again later.
            lines[0] += f" (resume with resume:{msg['id']}:{msg['token']})"
        lines += _friendLines([_loads(f) for f in msg.get("friends", [])])
        lines += _groupLines([_loads(g) for g in msg.get("groups", [])])
        lines += [_requestLine(r) for r in msg.get("requests", [])]
        offline = msg.get("offlinemsg", [])
        if offline:
            lines.append(f"{len(offline)} offline message(s):")
            for payload in offline:
                lines += _render(_loads(payload))
        return lines
    if msgid == m.PASSWD_MSG_ACK:
        line = "password changed; older resume tokens are revoked"
        if msg.get("token"):
            line += f" (resume with resume:{msg['id']}:{msg['token']})"
        return [line]
    if msgid == m.REG_MSG_ACK:
        return [f"registered: your id is {msg['id']}; log in with login:{msg['id']}:PASSWORD"]
    if msgid == m.LOGINOUT_MSG_ACK:
        return ["logged out"]
    if msgid == m.ONE_CHAT_MSG_ACK:
        how = {"delivered": "delivered to", "sent": "sent to"}.get(msg.get("state"), "stored offline for")
        return [f"{how} [{msg['toid']}]"]
    if msgid == m.ADD_FRIEND_MSG_ACK:
        if msg.get("state") == "requested":
            return [f"request sent to [{msg['friend']['id']}]"]
        if msg.get("state") == "friends":
            return [f"already friends: {_user(msg['friend'])}"]
        return [f"friend added: {_user(msg['friend'])}"]
    if msgid == m.FRIEND_REPLY_MSG_ACK:
        if msg.get("accept"):
            return [f"friend added: {_user(msg['friend'])}"]
        return [f"refused [{msg['id']}]'s friend request"]
    if msgid == m.FRIEND_REQUEST_NOTICE:
        return [_requestLine(msg)]
    if msgid == m.CREATE_GROUP_MSG_ACK:
        return [f"group created: [{msg['groupid']}]{msg['groupname']}"]
    if msgid == m.ADD_GROUP_MSG_ACK:
        return [f"joined group [{msg['groupid']}]{msg['groupname']}"]
    if msgid == m.GROUP_CHAT_MSG_ACK:
        return [f"sent to group [{msg['groupid']}]: {msg['delivered']} online, {msg['stored']} stored offline"]
    if msgid == m.FRIEND_LIST_MSG_ACK:
        return _friendLines(msg["friends"], empty=True) + [_requestLine(r) for r in msg.get("requests", [])]
    if msgid == m.GROUP_LIST_MSG_ACK:
        return _groupLines(msg["groups"], empty=True)
    if msgid == m.KICK_NOTICE:
        return [f"disconnected: {msg.get('reason', '')}"]
    if msgid == m.FRIEND_STATE_NOTICE:
        return [f"[{msg['id']}]{msg['name']} is now {msg['state']}"]
    if msgid == m.FRIEND_ADDED_NOTICE:
        return [f"[{msg['id']}]{msg['name']} added you as a friend"]
    return [m.encode(msg).decode("utf-8")]


def _friendLines(friends: list, empty: bool = False) -> list[str]:
    if not friends:
        return ["no friends yet"] if empty else []
    return ["friends:"] + ["  " + _user(f) for f in friends]


def _requestLine(request: dict) -> str:
    uid = request["id"]
    return f"friend request from [{uid}]{request['name']} (accept with: accept:{uid}, refuse with: refuse:{uid})"


def _groupLines(groups: list, empty: bool = False) -> list[str]:
    if not groups:
        return ["no groups yet"] if empty else []
    lines = ["groups:"]
    for g in groups:
        desc = f": {g['groupdesc']}" if g.get("groupdesc") else ""
        lines.append(f"  [{g['id']}]{g['groupname']}{desc}")
        for u in g.get("users", []):
            lines.append("    " + _user(_loads(u)))
    return lines
