"""Who may do what with a concept: roles, the actions each allows, and invite links.

Three roles, each allowing everything the one before it does:

* ``viewer``: read the concept, its batches, models, agreement and plot;
* ``rater``: also rate, add exemplars (picked or uploaded) and search the corpus for them;
* ``owner``: also edit phrases and instructions, start rounds (and the search for the first
  images, and the evaluation), manage raters and invites, decide the review queue, export.

The person who creates a concept owns it. Others get a role from a membership, given by the
owner directly (``agile concept grant``) or through an **invite link**: a random token that
grants one role on one concept. Only the token's SHA-256 is stored, so the link is shown once,
when it is made. An invite may expire (it then admits nobody new; who joined keeps access) and
may be revoked (it then admits nobody, and everyone who joined through it loses access at once).

With sign-in off the app serves one trusted person on loopback, who is the owner of everything
(:func:`resolve_role` with ``user=None``). A signed-in user with no role on a concept gets
``default_role`` (``None`` unless the deployment opts in with ``AGILE_APP_DEFAULT_ROLE``).

Pure: the state store holds the rows (``StateStore.members`` / ``invites``), this module decides.
"""

import hashlib
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from agile_pipeline.lib.state import StateError

Role = Literal["viewer", "rater", "owner"]
ROLES: tuple[Role, ...] = ("viewer", "rater", "owner")
INVITE_ROLES: tuple[Role, ...] = ("viewer", "rater")
Action = Literal["read", "rate", "edit", "train", "manage", "export"]
ACTION_ROLE: dict[str, Role] = {
    "read": "viewer",
    "rate": "rater",  # labels, exemplars, search
    "edit": "owner",  # phrases, instructions
    "train": "owner",  # rounds, first-image search, evaluation
    "manage": "owner",  # members, invites, review-queue decisions
    "export": "owner",
}
ACTION_WORDS = {
    "read": "open it", "rate": "rate its images", "edit": "edit its phrases or instructions",
    "train": "start its rounds", "manage": "manage its raters and invites", "export": "export its models",
}
TOKEN_BYTES = 24


class AccessDenied(StateError):
    """The user's role on the concept does not allow the action (``role`` is ``None`` when they
    have none: the concept is then reported as not found, which shows nothing about it)."""

    def __init__(self, message: str, *, role: Role | None) -> None:
        super().__init__(message)
        self.role = role


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise StateError(f"role {role[:20]!r} is not one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def allows(role: Role | None, action: str) -> bool:
    """Whether ``role`` may do ``action`` (an unknown action is never allowed)."""
    need = ACTION_ROLE.get(action)
    return role is not None and need is not None and ROLES.index(role) >= ROLES.index(need)


def new_invite_token() -> str:
    """A fresh invite token: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def invite_status(invite: Mapping[str, Any], now: float) -> Literal["active", "expired", "revoked"]:
    if invite.get("revoked_at") is not None:
        return "revoked"
    expires = invite.get("expires_at")
    if expires is not None and now >= float(expires):
        return "expired"
    return "active"


def membership_role(row: Mapping[str, Any]) -> Role | None:
    """The role a membership row gives: none once the invite it came through is revoked."""
    if row.get("invite_id") and row.get("invite_revoked_at") is not None:
        return None
    return check_role(str(row["role"]))


def resolve_role(
    *, owner: str, user: str | None, memberships: Iterable[Mapping[str, Any]], default_role: Role | None = None,
) -> Role | None:
    """``user``'s role on a concept owned by ``owner``, given that concept's membership rows.

    ``user=None`` is the one person of a deployment without sign-in: the owner of everything.
    """
    if user is None or user == owner:
        return "owner"
    roles = [r for row in memberships if row.get("user") == user and (r := membership_role(row))]
    if roles:
        return max(roles, key=ROLES.index)
    return default_role


def denial(concept: str, user: str | None, role: Role | None, action: str, owner: str) -> AccessDenied:
    """The refusal a user reads: what they are, what the action needs, and whom to ask."""
    if role is None:
        return AccessDenied(
            f"no concept {concept!r} that you can open; if someone shared it with you, open "
            "their invite link again (it may have been revoked) or ask them for a new one",
            role=None,
        )
    need = ACTION_ROLE.get(action, "owner")
    return AccessDenied(
        f"you ({user}) are a {role} of {concept!r}: only {'its owner' if need == 'owner' else 'a ' + need} "
        f"can {ACTION_WORDS.get(action, action)}; ask its owner ({owner})"
        + (" for a rater invite" if need == "rater" else ""),
        role=role,
    )


def parse_expiry(text: str | None) -> float | None:
    """An invite lifetime in seconds from ``never``/empty, ``N`` + ``h``/``d``/``w`` (e.g. ``7d``)."""
    raw = (text or "").strip().lower()
    if raw in ("", "never", "none", "0"):
        return None
    units = {"h": 3600.0, "d": 86400.0, "w": 604800.0}
    if raw[-1:] in units and raw[:-1].isdigit() and 0 < int(raw[:-1]) <= 10_000:
        return int(raw[:-1]) * units[raw[-1]]
    raise StateError(f"invite lifetime {raw[:20]!r}: use never, or a number with h, d or w (e.g. 7d)")
