"""
The group handlers: create, join, group chat, list.

L{chatproto.service.ChatService} routes C{CREATE_GROUP_MSG},
C{ADD_GROUP_MSG}, C{GROUP_CHAT_MSG} and C{GROUP_LIST_MSG} here, as it routes
friend requests to L{chatproto.friendrequests}.
"""

from __future__ import annotations

from chatproto import messages as m
from chatproto.interfaces import NameTaken, NoSuchGroup
from chatproto.login import groupDict
from chatproto.messages import RequestError
from chatproto.tasks import storeCall


async def deliverCounted(delivery, uids, message) -> tuple[int, int]:
    """Deliver a group chat; (stored offline, refused: mailbox full)."""
    try:
        return len(await delivery.deliver(uids, message, store=True)), 0
    except RequestError as e:
        full = getattr(e, "mailboxFull", None)
        if full is None:
            raise
        # Some members' mailboxes are full: the others have it.
        return len(full.stored), len(full.refused)


class GroupHandlers:
    """
    @param now: returns the server's time as text, for the C{time} field.
    @param mid: returns the mid of a chat (session, request).
    """

    def __init__(self, store, registry, delivery, friendRequests, now, mid) -> None:
        self.mid = mid
        self.store = store
        self.registry = registry
        self.delivery = delivery
        self.friendRequests = friendRequests
        self.now = now

    async def create(self, session, request) -> dict:
        name = m.checkName(request.args["groupname"], m.MAX_GROUPNAME, "group name")
        desc = request.args["groupdesc"].strip()
        if len(desc) > m.MAX_GROUPDESC:
            raise RequestError(m.E_INVALID, f"group description is longer than {m.MAX_GROUPDESC} characters")
        try:
            gid = await storeCall(self.store.createGroup(name, desc, session.uid))
        except NameTaken:
            raise RequestError(m.E_NAME_TAKEN, f"a group named {name!r} exists") from None
        return {"msgid": m.CREATE_GROUP_MSG_ACK, "errno": m.OK, "groupid": gid, "groupname": name, "groupdesc": desc}

    async def join(self, session, request) -> dict:
        gid = request.args["groupid"]
        try:
            new = await storeCall(self.store.joinGroup(gid, session.uid))
            group = await storeCall(self.store.getGroup(gid))
        except NoSuchGroup:
            raise RequestError(m.E_NO_SUCH_GROUP, f"no group with id {gid}") from None
        return {"msgid": m.ADD_GROUP_MSG_ACK, "errno": m.OK, "groupid": gid, "groupname": group.name, "new": bool(new)}

    async def chat(self, session, request) -> dict:
        gid = request.args["groupid"]
        text = request.args["msg"]
        if not text:
            raise RequestError(m.E_BAD_FIELD, "msg must not be empty")
        try:
            members = await storeCall(self.store.getGroupMembers(gid))
        except NoSuchGroup:
            raise RequestError(m.E_NO_SUCH_GROUP, f"no group with id {gid}") from None
        if not any(u.id == session.uid for u in members):
            raise RequestError(m.E_NOT_A_MEMBER)
        out = {
            "msgid": m.GROUP_CHAT_MSG,
            "id": session.uid,
            "name": session.name,
            "groupid": gid,
            "msg": text,
            "time": self.now(),
            "mid": self.mid(session, request),
        }
        others = [u.id for u in members if u.id != session.uid]
        stored, full = await deliverCounted(self.delivery, others, out)
        ack = {"msgid": m.GROUP_CHAT_MSG_ACK, "errno": m.OK, "groupid": gid, "delivered": len(others) - stored - full}
        return dict(ack, stored=stored, **({"full": full} if full else {}))

    async def list(self, session, request) -> dict:
        groups = await storeCall(self.store.getUserGroups(session.uid))
        states = await self.registry.states({u.id for g in groups for u in g.members})
        states = await self.friendRequests.visibleStates(session.uid, states)
        return {
            "msgid": m.GROUP_LIST_MSG_ACK,
            "errno": m.OK,
            "groups": [groupDict(g, states) for g in groups],
        }
