"""Who may talk to the server: loopback by default; any other address only with API keys, checked in
constant time on every endpoint but /health.

A key arrives as `Authorization: Bearer KEY` (API clients) or as HTTP Basic with the key as the password
(the browser page: the browser asks once and sends it with every request of the page).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import stat
from pathlib import Path

from medgemma_edge.errors import UserError

MIN_KEY_CHARS = 16
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, or the name localhost; 0.0.0.0 and :: (every interface) are not."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def read_keys(path: Path) -> list[str]:
    """One key per line (blank lines and # comments skipped); refuses an empty file and short keys."""
    fix = "write one key of at least 16 characters per line (e.g. `openssl rand -hex 32 > keys.txt`)"
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path}: the API key file is not a regular file; {fix}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: API key file not found; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the API key file ({type(exc).__name__}); {fix}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise UserError(f"{path}: the API key file holds no key; {fix}")
    short = [i + 1 for i, k in enumerate(keys) if len(k) < MIN_KEY_CHARS or any(c.isspace() for c in k)]
    if short:
        raise UserError(f"{path}: key {short[0]} is shorter than {MIN_KEY_CHARS} characters or holds spaces; {fix}")
    if os.name == "posix" and st.st_mode & 0o077:
        import logging

        logging.getLogger(__name__).warning("%s: the API key file is readable by other users; chmod 600 it", path)
    return keys


def check_bind(host: str, keys: list[str] | None) -> None:
    """Refuse, before binding, to listen beyond this machine without keys."""
    if not keys and not is_loopback(host):
        raise UserError(f"--host {host}: listening beyond this machine needs API keys; pass --api-key-file FILE "
                        f"(one key per line), or keep the default --host 127.0.0.1")


class Keys:
    """The accepted keys; `check` compares against every one of them in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode("utf-8") for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> tuple[int, str | None]:
        """(0, key id) when accepted; (401, None) when no key was sent; (403, None) for a wrong one."""
        given = presented_key(authorization)
        if given is None:
            return 401, None
        match = None
        for i, key in enumerate(self._keys):  # no early exit: the time does not say which key was near
            if hmac.compare_digest(key, given):
                match = i
        if match is None:
            return 403, None
        return 0, hashlib.sha256(self._keys[match]).hexdigest()[:12]  # names the key in the audit, reveals nothing


def presented_key(authorization: str | None) -> bytes | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() in ("bearer", "basic") and not value:
        return None  # `Bearer ` with nothing after it: no key sent
    if scheme.lower() == "bearer" and value:
        return value.encode("utf-8", "surrogateescape")
    if scheme.lower() == "basic" and value:
        try:
            user_pass = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return b""  # sent but unreadable: a wrong key
        return user_pass.partition(b":")[2]
    return b""  # another scheme: a credential was sent, and it is not ours
