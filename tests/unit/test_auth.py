"""Keys (format, hashing, checking), scopes, the start rule and `lowering-service keys`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from app import cli
from app.auth import (
    AuthConfigError,
    KeyStore,
    Scope,
    auth_mode,
    bearer_key,
    check_keys_exist,
    effective,
    is_loopback,
    key_hmac,
    new_key,
    parse_scopes,
)
from app.errors import Forbidden, Unauthorized
from app.jobs import migrate
from app.jobs.store import JobStore
from app.main import create_app
from app.settings import Settings

PEPPER = "unit-test-pepper-0123456789"


def test_a_new_key_parses_back_to_its_id_and_secret() -> None:
    key, key_id, secret = new_key()
    assert key.startswith("lsk_") and len(key_id) == 16 and len(secret) == 64
    assert bearer_key(f"Bearer {key}") == (key_id, secret)
    assert bearer_key(f"bearer   {key} ") == (key_id, secret)
    assert new_key()[0] != key


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "Basic abc", "Bearer lsk_", "Bearer lsk_abc_def",
    "Bearer sk_0123456789abcdef_" + "0" * 64, "Bearer lsk_0123456789abcdeg_" + "0" * 64,
    "Bearer lsk_0123456789abcdef_" + "0" * 63, "Bearer lsk_0123456789abcdef_" + "0" * 65,
    "Bearer lsk_0123456789ABCDEF_" + "0" * 64, "Bearer lsk_0123456789abcdef_" + "0" * 64 + "_",
    "Bearer lsk_0123456789abcdef_" + "0" * 64 + " extra",
])
def test_malformed_authorization_is_401(header: str | None) -> None:
    with pytest.raises(Unauthorized) as caught:
        bearer_key(header)
    assert caught.value.status == 401 and caught.value.code == "unauthorized"


def test_the_hmac_depends_on_pepper_and_secret() -> None:
    assert key_hmac("p" * 16, "s") == key_hmac("p" * 16, "s")
    assert key_hmac("p" * 16, "s") != key_hmac("q" * 16, "s") != key_hmac("p" * 16, "t")
    assert len(key_hmac("p" * 16, "s")) == 64


def test_scopes_nest_and_unknown_ones_are_refused() -> None:
    assert effective(["read"]) == {Scope.READ}
    assert effective(["submit"]) == {Scope.READ, Scope.SUBMIT}
    assert effective(["admin"]) == set(Scope)
    assert effective(["bogus"]) == frozenset()
    assert parse_scopes(" submit, read ,submit") == ["read", "submit"]
    for bad in ("", "root", "read,write"):
        with pytest.raises(ValueError, match="known: read, submit, admin"):
            parse_scopes(bad)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_a_loopback_bind_defaults_to_off(host: str) -> None:
    assert is_loopback(host)
    assert auth_mode(auth=None, host=host, pepper=None) == "off"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "api.example.com"])
def test_any_other_bind_refuses_to_start_unless_told(host: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(AuthConfigError, match="LOWERING_AUTH=required"):
        auth_mode(auth=None, host=host, pepper=None)
    with pytest.raises(AuthConfigError, match="LOWERING_AUTH_PEPPER"):
        auth_mode(auth="required", host=host, pepper=None)
    assert auth_mode(auth="required", host=host, pepper=PEPPER) == "required"
    with caplog.at_level(logging.WARNING, logger="app.auth"):
        assert auth_mode(auth="off", host=host, pepper=None) == "off"
    assert "ANYONE" in caplog.text


def test_create_app_refuses_a_public_bind_without_auth(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError):
        create_app(Settings(data_dir=tmp_path, host="0.0.0.0"))
    create_app(Settings(data_dir=tmp_path, host="0.0.0.0", auth="off"))


def test_the_pepper_never_shows_in_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auth="required", auth_pepper=PEPPER)
    assert PEPPER not in repr(settings) and PEPPER not in str(settings.model_dump())


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate.upgrade(url)
    store = JobStore(url)
    yield KeyStore(store.engine, PEPPER)  # type: ignore[misc]
    store.close()


def test_keys_authenticate_until_revoked(keys: KeyStore) -> None:
    with pytest.raises(AuthConfigError, match="keys create"):
        check_keys_exist(keys)
    key, row = keys.create(tenant="acme", scopes=["read"])
    check_keys_exist(keys)
    principal = keys.authenticate(f"Bearer {key}")
    assert (principal.tenant, principal.scopes, principal.key_id) == ("acme", {Scope.READ},
                                                                      row["id"])
    principal.require(Scope.READ)
    with pytest.raises(Forbidden, match="'submit'"):
        principal.require(Scope.SUBMIT)
    # The secret of another key, a key under another pepper: both unknown.
    other, _ = keys.create(tenant="acme", scopes=["admin"])
    with pytest.raises(Unauthorized):
        keys.authenticate(f"Bearer {key[:21]}{other[21:]}")
    with pytest.raises(Unauthorized):
        KeyStore(keys.engine, "another-pepper-entirely").authenticate(f"Bearer {key}")
    assert keys.revoke(row["id"]) and not keys.revoke(row["id"])
    with pytest.raises(Unauthorized):
        keys.authenticate(f"Bearer {key}")
    listed = keys.all()
    assert [r["tenant"] for r in listed] == ["acme", "acme"]
    assert all("key_hmac" not in r for r in listed) and listed[0]["revoked_at"] is not None
    with pytest.raises(ValueError, match="tenant"):
        keys.create(tenant="../etc", scopes=["read"])


def test_cli_keys_create_list_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOWERING_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("LOWERING_DATABASE_URL", raising=False)
    monkeypatch.delenv("LOWERING_AUTH_PEPPER", raising=False)
    assert cli.main(["keys", "create", "--tenant", "acme"]) == 1
    assert "LOWERING_AUTH_PEPPER" in capsys.readouterr().err
    monkeypatch.setenv("LOWERING_AUTH_PEPPER", PEPPER)
    assert cli.main(["keys", "create", "--tenant", "acme", "--scope", "root"]) == 2
    assert "unknown scope" in capsys.readouterr().err
    assert cli.main(["keys", "create", "--tenant", "no/slash"]) == 2
    capsys.readouterr()
    assert cli.main(["keys", "create", "--tenant", "acme", "--scope", "read,submit"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    key_id = bearer_key(f"Bearer {key}")[0]
    assert cli.main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "acme" in listed and "read,submit" in listed
    assert key.split("_")[2] not in listed
    assert cli.main(["keys", "revoke", key_id]) == 0
    assert cli.main(["keys", "revoke", key_id]) == 1
    store = JobStore(Settings().db_url)
    try:
        with pytest.raises(Unauthorized):
            KeyStore(store.engine, PEPPER).authenticate(f"Bearer {key}")
    finally:
        store.close()


def test_cli_tenants_set_and_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOWERING_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("LOWERING_DATABASE_URL", raising=False)
    monkeypatch.setenv("LOWERING_TENANT_MAX_ACTIVE_JOBS", "7")
    assert cli.main(["tenants", "set", "acme", "--max-storage-bytes", "1000"]) == 0
    assert cli.main(["tenants", "set", "globex", "--max-active-jobs", "2"]) == 0
    assert cli.main(["tenants", "set", "bad/name"]) == 2
    capsys.readouterr()
    assert cli.main(["tenants", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["(default)", "7", "-"]
    assert lines[2].split() == ["acme", "(default)", "1000"]
    assert lines[3].split() == ["globex", "2", "(default)"]
    store = JobStore(Settings().db_url)
    try:
        assert store.tenant_limits(tenant="acme") == (None, 1000)
        assert store.tenant_limits(tenant="nobody") == (None, None)
    finally:
        store.close()
