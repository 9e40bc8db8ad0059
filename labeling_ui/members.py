"""Who may do what in the app: each user's role per concept, invite links, and the owner's
management of both (the policy itself is :mod:`agile_pipeline.lib.access`).

Every route of :mod:`labeling_ui.api` and every Gradio event of :mod:`labeling_ui.app` asks
:meth:`Members.require` before it reads or changes a concept, with the signed-in user (``None``
when sign-in is off: the app then serves one trusted person, the owner of everything).
"""

import re
import time
from dataclasses import dataclass
from typing import Any

from agile_pipeline.lib import access
from agile_pipeline.lib.access import Role
from agile_pipeline.lib.state import Concept, StateError, clean_text
from labeling_ui.config import UiSettings, valid_rater_name
from labeling_ui.context import ServiceContext

TOKEN = re.compile(r"^[A-Za-z0-9_\-]{20,64}\Z")
INVITE_ID = re.compile(r"^[0-9a-f]{12}\Z")
MAX_NOTE = 80


class InviteGone(StateError):
    """An invite that existed but no longer admits anyone (revoked or expired)."""


@dataclass
class AccessSettings:
    """``auth_enabled``: whether users sign in (roles apply only then); ``default_role``: the
    role of a signed-in user on a concept they have no role on (``None``: no access)."""

    auth_enabled: bool = False
    default_role: Role | None = None


class Members:
    """Roles, invites and members of concepts, over the shared state store, for one app's
    :class:`AccessSettings` (cheap to make: it holds only the two)."""

    def __init__(self, context: ServiceContext, settings: AccessSettings | None = None) -> None:
        self.store = context.store
        self.settings = settings or AccessSettings()

    @classmethod
    def for_app(cls, context: ServiceContext, settings: UiSettings) -> "Members":
        return cls(context, AccessSettings(settings.auth_enabled, settings.default_role))

    # ---- roles --------------------------------------------------------------------------
    def role(self, concept: Concept, user: str | None) -> Role | None:
        if not self.settings.auth_enabled:
            return "owner"
        return access.resolve_role(owner=concept.owner, user=user, memberships=self.store.members(concept.name),
                                   default_role=self.settings.default_role)

    def require(self, concept: str, user: str | None, action: str) -> Concept:
        """The concept, when ``user`` may do ``action`` on it; :class:`AccessDenied` otherwise
        (an unknown concept and one the user has no role on read the same)."""
        try:
            c = self.store.get_concept(concept)
        except StateError:
            if not self.settings.auth_enabled:
                raise
            raise access.denial(str(concept)[:64], user, None, action, "") from None
        role = self.role(c, user)
        if not access.allows(role, action):
            raise access.denial(c.name, user, role, action, c.owner)
        return c

    def visible(self, user: str | None) -> list[str]:
        """The concepts ``user`` may open, in name order (two queries, whatever their number)."""
        owners = self.store.concept_owners()
        if not self.settings.auth_enabled:
            return list(owners)
        mine: dict[str, list[dict[str, Any]]] = {}
        for m in self.store.members(user=user or ""):
            mine.setdefault(m["concept"], []).append(m)
        return [name for name, owner in owners.items()
                if access.resolve_role(owner=owner, user=user, memberships=mine.get(name, ()),
                                       default_role=self.settings.default_role)]

    # ---- invites ------------------------------------------------------------------------
    def create_invite(self, concept: str, user: str | None, *, role: str = "rater", lifetime: str | None = "7d",
                      note: str = "") -> tuple[str, dict[str, Any]]:
        """A new invite link's token (shown once) and its record; owners only."""
        c = self.require(concept, user, "manage")
        self._need_sign_in()
        if role not in access.INVITE_ROLES:
            raise StateError(f"an invite grants {' or '.join(access.INVITE_ROLES)}, not {str(role)[:20]!r}")
        seconds = access.parse_expiry(lifetime)
        note = clean_text(str(note or ""))[:MAX_NOTE]
        token = access.new_invite_token()
        row = self.store.create_invite(
            c.name, role, token_sha256=access.token_sha256(token), created_by=user or c.owner,
            expires_at=time.time() + seconds if seconds else None, note=note,
        )
        return token, row

    def revoke_invite(self, concept: str, user: str | None, invite_id: str) -> dict[str, Any]:
        """Revoke an invite of ``concept``: it admits nobody from now on, and whoever joined
        through it loses access at once."""
        c = self.require(concept, user, "manage")
        row = self.store.invite(invite_id) if INVITE_ID.match(str(invite_id)) else None
        if row is None or row["concept"] != c.name:
            raise StateError(f"no invite {str(invite_id)[:20]!r} on {c.name!r}: the invite ids are listed in "
                             "the Raters tab and by `agile concept members`")
        self.store.revoke_invite(invite_id, revoked_by=user or c.owner)
        return self.store.invite(invite_id) or row

    def redeem(self, token: str, user: str | None) -> str:
        """Join a concept through an invite token; returns the concept's name.

        The invite must be active (not revoked, not expired). Redeeming twice is harmless, and
        never lowers a role the user already has.
        """
        if not self.settings.auth_enabled or not user:
            raise StateError("invite links work with sign-in on: sign in first, then open the link again")
        row = self.store.invite_by_token_sha256(access.token_sha256(token)) if TOKEN.match(str(token)) else None
        if row is None:
            raise StateError("this invite link is not valid: check that it was copied whole, or ask for a new one")
        status = access.invite_status(row, time.time())
        if status != "active":
            raise InviteGone(f"this invite link was {status}: ask the concept's owner for a new one")
        c = self.store.get_concept(row["concept"])
        current = self.role(c, user)
        if current is not None and access.ROLES.index(current) >= access.ROLES.index(row["role"]):
            return c.name
        self.store.set_member(c.name, user, row["role"], granted_by=row["created_by"], invite_id=row["invite_id"])
        self.store.record_invite_use(row["invite_id"])
        return c.name

    # ---- members ------------------------------------------------------------------------
    def grant(self, concept: str, user: str | None, member: str, role: str) -> None:
        """Give ``member`` ``role`` directly (not through an invite); owners only."""
        c = self.require(concept, user, "manage")
        role = access.check_role(role)
        if role == "owner":
            raise StateError("a concept has one owner; give others the rater or viewer role")
        if not valid_rater_name(member) or member == c.owner:
            raise StateError(f"cannot give a role to {member[:64]!r}: not a sign-in name, or the owner")
        self.store.set_member(c.name, member, role, granted_by=user or c.owner)

    def remove(self, concept: str, user: str | None, member: str) -> bool:
        """Take ``member``'s role away; owners only. Their ratings stay."""
        c = self.require(concept, user, "manage")
        return self.store.remove_member(c.name, member)

    def overview(self, concept: str, user: str | None) -> dict[str, Any]:
        """Members and invites of ``concept`` with their status (for its owner)."""
        c = self.require(concept, user, "manage")
        now = time.time()
        invites = [{**{k: v for k, v in r.items() if k != "token_sha256"}, "status": access.invite_status(r, now)}
                   for r in self.store.invites(c.name)]
        members = [{"user": m["user"], "role": m["role"], "via_invite": m["invite_id"],
                    "active": access.membership_role(m) is not None, "granted_at": m["granted_at"]}
                   for m in self.store.members(c.name)]
        return {"concept": c.name, "owner": c.owner, "members": members, "invites": invites}

    def _need_sign_in(self) -> None:
        if not self.settings.auth_enabled:
            raise StateError(
                "invite links need sign-in: start the app with AGILE_APP_AUTH=name:password,... "
                "(one entry per person); without it the app serves only you, on this machine"
            )
