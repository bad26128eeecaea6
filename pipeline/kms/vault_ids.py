"""Vault transit key ids, `vault:<mount>:<name>[:<version>]`: parsed and checked once, here.

The id becomes part of a request URL (`/v1/<mount>/encrypt/<name>`), so it is checked
strictly: a mount is one or more `/`-separated segments, a name is what transit itself accepts
as a key name, and neither holds `:`, `..` or anything that would need escaping. A wrapping-key
id never carries a version (Vault's ciphertext does); a canonical signing-key id always does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PREFIX", "VaultKeyRef", "parse_key_id"]

PREFIX = "vault:"

# A mount segment, and transit's own key-name rule (framework.GenericNameRegex).
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
_NAME = re.compile(r"\w(?:[\w.@-]*\w)?", re.ASCII)
_VERSION = re.compile(r"[1-9][0-9]{0,9}")

_FORM = "vault:<mount>:<name> (e.g. vault:transit:orders)"


@dataclass(frozen=True, slots=True)
class VaultKeyRef:
    """One transit key, and for a signing key one version of it."""

    mount: str
    name: str
    version: int | None = None

    @property
    def key_id(self) -> str:
        """`vault:<mount>:<name>`, without the version."""
        return f"{PREFIX}{self.mount}:{self.name}"

    @property
    def canonical(self) -> str:
        """The id envelopes carry: with `:<version>` when one is set."""
        return self.key_id if self.version is None else f"{self.key_id}:{self.version}"

    def at(self, version: int) -> VaultKeyRef:
        """The same key, pinned to `version`."""
        return VaultKeyRef(self.mount, self.name, version)

    def path(self, operation: str, *suffix: str) -> str:
        """The API path (without `/v1/`) of `operation` on this key, as a policy names it."""
        return "/".join((self.mount, operation, self.name, *suffix))


def parse_key_id(text: str, *, version: bool | None) -> VaultKeyRef:
    """Parse `vault:<mount>:<name>[:<version>]`; ValueError with a readable reason if not.

    `version`: True requires `:<version>`, False forbids it, None accepts either.
    """
    if not text.startswith(PREFIX):
        raise ValueError(f"{text!r} is not a Vault key id; expected {_FORM}")
    parts = text[len(PREFIX) :].split(":")
    if len(parts) not in (2, 3):
        raise ValueError(
            f"{text!r} is not a Vault key id; expected {_FORM} or, for a signing key, "
            "vault:<mount>:<name>:<version> (neither mount nor name may contain ':')"
        )
    mount, name = parts[0], parts[1]
    segments = mount.split("/")
    if not all(_SEGMENT.fullmatch(seg) and seg not in (".", "..") for seg in segments):
        raise ValueError(
            f"{text!r}: the mount {mount!r} must be path segments of letters, digits, "
            "'_', '.' and '-', separated by single '/' (no leading or trailing '/')"
        )
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{text!r}: the key name {name!r} must be letters, digits, '_', '.', '@' and '-', "
            "starting and ending with a letter or digit"
        )
    number: int | None = None
    if len(parts) == 3:
        if not _VERSION.fullmatch(parts[2]):
            raise ValueError(f"{text!r}: the version {parts[2]!r} must be a positive integer")
        number = int(parts[2])
    if version is True and number is None:
        raise ValueError(
            f"{text!r} names no key version; a canonical signing-key id is "
            "vault:<mount>:<name>:<version> (resolve_signing_key gives one)"
        )
    if version is False and number is not None:
        raise ValueError(
            f"{text!r}: a wrapping-key id has no version (Vault's ciphertext carries it); "
            f"use {PREFIX}{mount}:{name}"
        )
    return VaultKeyRef(mount, name, number)
