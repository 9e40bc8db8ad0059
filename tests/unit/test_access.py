"""The role policy and invite tokens (pure: ``agile_pipeline.lib.access``)."""

import pytest

from agile_pipeline.lib import access
from agile_pipeline.lib.state import StateError


@pytest.mark.parametrize(("role", "allowed"), [
    ("viewer", {"read"}),
    ("rater", {"read", "rate"}),
    ("owner", {"read", "rate", "edit", "train", "manage", "export"}),
    (None, set()),
])
def test_each_role_allows_its_actions_and_no_more(role: access.Role | None, allowed: set[str]) -> None:
    assert {a for a in access.ACTION_ROLE if access.allows(role, a)} == allowed
    assert not access.allows(role, "delete everything")  # an unknown action is never allowed


def test_roles_resolve_from_owner_memberships_and_default() -> None:
    rows = [{"user": "bob", "role": "rater", "invite_id": None},
            {"user": "cy", "role": "viewer", "invite_id": "i1", "invite_revoked_at": None},
            {"user": "dee", "role": "rater", "invite_id": "i2", "invite_revoked_at": 5.0}]
    resolve = access.resolve_role
    assert resolve(owner="al", user="al", memberships=rows) == "owner"
    assert resolve(owner="al", user=None, memberships=rows) == "owner"  # sign-in off: one trusted person
    assert resolve(owner="al", user="bob", memberships=rows) == "rater"
    assert resolve(owner="al", user="cy", memberships=rows) == "viewer"
    assert resolve(owner="al", user="dee", memberships=rows) is None  # joined through a revoked invite
    assert resolve(owner="al", user="eve", memberships=rows) is None
    assert resolve(owner="al", user="eve", memberships=rows, default_role="viewer") == "viewer"
    assert resolve(owner="al", user="dee", memberships=rows, default_role="rater") == "rater"


def test_invites_expire_and_revoke() -> None:
    assert access.invite_status({"revoked_at": None, "expires_at": None}, 1e9) == "active"
    assert access.invite_status({"revoked_at": None, "expires_at": 100.0}, 99.0) == "active"
    assert access.invite_status({"revoked_at": None, "expires_at": 100.0}, 100.0) == "expired"
    assert access.invite_status({"revoked_at": 50.0, "expires_at": 100.0}, 60.0) == "revoked"


def test_tokens_are_random_and_only_their_digest_is_kept() -> None:
    tokens = {access.new_invite_token() for _ in range(200)}
    assert len(tokens) == 200 and all(len(t) == 32 for t in tokens)
    t = next(iter(tokens))
    assert access.token_sha256(t) != t and len(access.token_sha256(t)) == 64
    assert access.token_sha256(t) == access.token_sha256(t)


@pytest.mark.parametrize(("text", "seconds"), [("never", None), ("", None), ("12h", 43200.0), ("7d", 604800.0),
                                               ("2w", 1209600.0)])
def test_invite_lifetimes(text: str, seconds: float | None) -> None:
    assert access.parse_expiry(text) == seconds


@pytest.mark.parametrize("text", ["7", "-1d", "1y", "d", "99999d", "1.5d"])
def test_bad_invite_lifetimes_say_what_to_write(text: str) -> None:
    with pytest.raises(StateError, match="7d"):
        access.parse_expiry(text)


def test_refusals_say_what_the_user_is_and_whom_to_ask() -> None:
    e = access.denial("birds", "bob", "rater", "train", "al")
    assert e.role == "rater" and "you (bob) are a rater of 'birds'" in str(e) and "ask its owner (al)" in str(e)
    e = access.denial("birds", "cy", "viewer", "rate", "al")
    assert "rater invite" in str(e)
    e = access.denial("birds", "eve", None, "read", "al")
    assert e.role is None and "al" not in str(e)  # nothing about the concept is shown to a stranger
