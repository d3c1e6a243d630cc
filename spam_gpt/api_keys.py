"""API keys for the endpoint: where they come from and how a request's key is checked.

Keys come from a file (one per line, ``#`` comments allowed; on a cluster, a mounted
secret) and from ``SPAM_GPT_API_KEYS`` (comma-separated; on a cluster, set where the
nodes start), never from a config file. Only their SHA-256 digests are kept, and every
digest is compared in constant time, so neither the answer nor its timing says how much
of a wrong key was right.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

KEYS_VARIABLE = "SPAM_GPT_API_KEYS"


class ApiKeyError(ValueError):
    """The keys could not be read; the message says which source and why."""


def read_api_keys(key_file: str | None = None, environ: dict | None = None) -> list[str]:
    """Every key from ``key_file`` and from ``SPAM_GPT_API_KEYS``; none means open."""
    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in environ.get(KEYS_VARIABLE, "").split(",") if k.strip()]
    if key_file:
        path = Path(key_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # Notepad adds a BOM
        except (OSError, UnicodeDecodeError) as error:
            raise ApiKeyError(f"cannot read the API key file {path}: {error}") from None
        from_file = [line.strip() for line in lines]
        from_file = [k for k in from_file if k and not k.startswith("#")]
        if not from_file:
            raise ApiKeyError(
                f"the API key file {path} holds no key (one key per line); an endpoint "
                "meant to be open needs no --api-key-file"
            )
        keys += from_file
    if any(any(c.isspace() for c in key) for key in keys):
        raise ApiKeyError("an API key contains white space; keys are single tokens")
    return keys


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyCheck:
    """Whether a bearer token is one of the keys."""

    def __init__(self, keys: list[str]):
        self.digests = [digest(key) for key in keys]

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def allows(self, token: str | None) -> bool:
        if not self.required:
            return True
        if not token:
            return False
        offered = digest(token)
        matched = False
        for known in self.digests:  # no early exit: the time taken does not depend on which
            matched |= hmac.compare_digest(offered, known)
        return matched
