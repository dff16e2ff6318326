"""API keys and tenants: who a request is, what it may do, and whether the service may start.

A key is ``lsk_<id>_<secret>``: ``id`` (16 hex) is public and finds the row, ``secret``
(64 hex, 256 random bits) is never stored: the row keeps HMAC-SHA256(pepper, secret),
the pepper being LOWERING_AUTH_PEPPER, which lives only in the API's environment (the
sandbox builds its children's environment from scratch). A fast keyed hash is right for
random 256-bit secrets (nothing to brute-force; djangorestframework-api-key moved off
password hashers for the same reason); the comparison is ``hmac.compare_digest`` and an
unknown id costs the same hash as a known one.

Scopes nest: ``read`` (GET jobs, artifacts, logs, events, uploads) < ``submit`` (read, and
create, cancel and delete lowerings and uploads) < ``admin`` (submit, and webhooks and
/metrics). Keys are made, listed and revoked with ``lowering-service keys`` (the database,
never HTTP). With LOWERING_AUTH=off every request is tenant ``default`` with every scope.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from app.errors import ApiErrorCode, Forbidden, Unauthorized
from app.jobs.models import DEFAULT_TENANT, api_keys
from app.jobs.store import _as_service_errors, retry_busy, utcnow

log = logging.getLogger("app.auth")
KEY_PREFIX = "lsk"
KEY_RE = re.compile(r"lsk_([0-9a-f]{16})_([0-9a-f]{64})")
TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LAST_USED_EVERY_S = 60.0
_DUMMY_HMAC = "0" * 64


class Scope(enum.StrEnum):
    """What a key may do; each implies the ones before it."""

    READ = "read"
    """GET lowerings (one, the list, artifact, log, events) and uploads."""
    SUBMIT = "submit"
    """read, and submit, cancel and delete lowerings; create, send and complete uploads."""
    ADMIN = "admin"
    """submit, and webhooks (/v1/webhooks) and /metrics."""


_ORDER = list(Scope)


def effective(scopes: list[str] | tuple[str, ...]) -> frozenset[Scope]:
    """The scopes a key's stored list grants (each implies the lower ones)."""
    known = {scope.value for scope in Scope}
    top = max((_ORDER.index(Scope(s)) for s in scopes if s in known), default=-1)
    return frozenset(_ORDER[: top + 1])


@dataclass(frozen=True)
class Principal:
    """Who a request is: its tenant, its scopes, and its key's id (None: auth off)."""

    tenant: str
    scopes: frozenset[Scope]
    key_id: str | None = None

    def require(self, scope: Scope) -> Principal:
        if scope not in self.scopes:
            raise Forbidden(f"this API key (tenant {self.tenant!r}) lacks the {scope.value!r} "
                            f"scope this route needs; make one with `lowering-service keys "
                            f"create --tenant {self.tenant} --scope {scope.value}`",
                            code=ApiErrorCode.FORBIDDEN_SCOPE)
        return self


ANONYMOUS = Principal(DEFAULT_TENANT, frozenset(Scope))
"""Every request while LOWERING_AUTH=off."""


def parse_scopes(text: str) -> list[str]:
    """``"submit,read"`` as a sorted list; ValueError naming the unknown ones."""
    names = sorted({part.strip() for part in text.split(",") if part.strip()})
    unknown = [name for name in names if name not in {s.value for s in Scope}]
    if unknown or not names:
        raise ValueError(f"unknown scope(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(s.value for s in Scope)}")
    return names


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant {tenant[:80]!r} must match {TENANT_RE.pattern} (letters, "
                         "digits, '_', '.', '-'; at most 64 characters)")
    return tenant


def key_hmac(pepper: str, secret: str) -> str:
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(the whole key, its public id, its secret)."""
    key_id, secret = secrets.token_hex(8), secrets.token_hex(32)
    return f"{KEY_PREFIX}_{key_id}_{secret}", key_id, secret


def bearer_key(authorization: str | None) -> tuple[str, str]:
    """(id, secret) of an ``Authorization: Bearer lsk_...`` header, or 401."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    if not authorization:
        raise Unauthorized("this service needs an API key: send `Authorization: Bearer "
                           "<key>` (lowerctl: --api-key or LOWERING_API_KEY)")
    match = KEY_RE.fullmatch(value.strip()) if scheme.lower() == "bearer" else None
    if match is None:
        raise Unauthorized("the Authorization header is not `Bearer lsk_<id>_<secret>`; send "
                           "the key `lowering-service keys create` printed")
    return match.group(1), match.group(2)


class KeyStore:
    """The ``api_keys`` table.

    :param engine: the job database's engine.
    :param pepper: LOWERING_AUTH_PEPPER (needed to make and to check keys, not to list
        or revoke them).
    """

    def __init__(self, engine: Engine, pepper: str | None) -> None:
        self.engine = engine
        self.pepper = pepper

    def _pepper(self) -> str:
        if not self.pepper:
            raise RuntimeError("LOWERING_AUTH_PEPPER is not set: keys cannot be made or "
                               "checked without it")
        return self.pepper

    @_as_service_errors
    @retry_busy
    def create(self, *, tenant: str, scopes: list[str]) -> tuple[str, dict[str, Any]]:
        """A new key for ``tenant``: (the key, shown once; its row without the hmac)."""
        key, key_id, secret = new_key()
        row = {"id": key_id, "tenant": check_tenant(tenant), "scopes": sorted(scopes),
               "key_hmac": key_hmac(self._pepper(), secret), "created_at": utcnow()}
        with self.engine.begin() as conn:
            conn.execute(insert(api_keys).values(**row))
        return key, {k: v for k, v in row.items() if k != "key_hmac"}

    @_as_service_errors
    def all(self) -> list[dict[str, Any]]:
        """Every key, oldest first, without its hmac."""
        columns = [c for c in api_keys.c if c.name not in ("key_hmac", "seq")]
        with self.engine.connect() as conn:
            rows = conn.execute(select(*columns).order_by(api_keys.c.seq)).all()
        return [_utc(dict(row._mapping)) for row in rows]

    @_as_service_errors
    def count_active(self) -> int:
        query = select(func.count()).where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    @_as_service_errors
    @retry_busy
    def revoke(self, key_id: str) -> bool:
        """True when the key existed and was not revoked yet."""
        query = (update(api_keys).where(api_keys.c.id == key_id)
                 .where(api_keys.c.revoked_at.is_(None)).values(revoked_at=utcnow()))
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    @_as_service_errors
    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an Authorization header, or 401 (missing, malformed, unknown,
        wrong secret or revoked: one message, so a caller learns nothing about ids)."""
        key_id, secret = bearer_key(authorization)
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        found = row._mapping if row is not None else None
        # The hash is computed and compared whether or not the id exists.
        matches = hmac.compare_digest(key_hmac(self._pepper(), secret),
                                      found["key_hmac"] if found else _DUMMY_HMAC)
        if found is None or not matches or found["revoked_at"] is not None:
            raise Unauthorized("the API key is unknown, wrong or revoked; ask for a new one "
                               "(`lowering-service keys create`)")
        self._touch(key_id, found["last_used_at"])
        return Principal(found["tenant"], effective(found["scopes"]), key_id)

    def _touch(self, key_id: str, last_used_at: dt.datetime | None) -> None:
        now = utcnow()
        if last_used_at is not None and last_used_at.tzinfo is None:
            last_used_at = last_used_at.replace(tzinfo=dt.UTC)
        if last_used_at is not None and (now - last_used_at).total_seconds() < LAST_USED_EVERY_S:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(update(api_keys).where(api_keys.c.id == key_id)
                             .values(last_used_at=now))
        except Exception as exc:  # bookkeeping: never fails a request
            log.warning("could not record the use of key %s: %s", key_id, exc)


def _utc(row: dict[str, Any]) -> dict[str, Any]:
    for key, value in row.items():
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            row[key] = value.replace(tzinfo=dt.UTC)
    return row


# -- the start rule -----------------------------------------------------------------------


class AuthConfigError(RuntimeError):
    """The service must not start with these auth settings; the message says what to set."""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_mode(*, auth: str | None, host: str, pepper: str | None) -> str:
    """``required`` or ``off`` for these settings, or AuthConfigError: a non-loopback bind
    needs LOWERING_AUTH set explicitly; ``required`` needs a pepper. Off off loopback is
    logged loudly."""
    if auth is None:
        if not is_loopback(host):
            raise AuthConfigError(
                f"LOWERING_HOST={host} is not a loopback address, and LOWERING_AUTH is not "
                "set: set LOWERING_AUTH=required (with LOWERING_AUTH_PEPPER and a key from "
                "`lowering-service keys create --tenant NAME`), or LOWERING_AUTH=off to serve "
                "everyone without keys")
        return "off"
    if auth == "required" and not pepper:
        raise AuthConfigError("LOWERING_AUTH=required needs LOWERING_AUTH_PEPPER (a random "
                              "secret of at least 16 characters, e.g. `openssl rand -hex 32`)")
    if auth == "off" and not is_loopback(host):
        log.warning("LOWERING_AUTH=off on %s: ANYONE WHO CAN REACH THIS PORT can submit, "
                    "read, cancel and delete every lowering (one tenant, 'default')", host)
    return auth


def check_keys_exist(keys: KeyStore) -> None:
    """With auth required, the service refuses to start until a key exists."""
    if keys.count_active() == 0:
        raise AuthConfigError("LOWERING_AUTH=required but the job database holds no active "
                              "API key: make one with `lowering-service keys create --tenant "
                              "NAME` (same LOWERING_DATABASE_URL/LOWERING_DATA_DIR and pepper)")
