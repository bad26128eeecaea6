"""Key identifiers: which ids an allowlist accepts, and per-record key templates. Pure.

Allowlists hold canonical ids (an ARN, `vault:<mount>:<name>[:<version>]`, a `pkcs11:` URI).
Two rules widen an entry, both spelled out so nothing matches by accident:

* a Vault signing-key entry without `:<version>` accepts every version of that key (the
  contract's rule, so a rotated signing key needs no allowlist change);
* an entry ending in `*` accepts every id that starts with what precedes it, so one entry
  can allow a family of per-tenant keys (`vault:transit:tenant-*`,
  `arn:aws:kms:eu-west-1:111122223333:key/*`). Use it only for a prefix you control.

A key template (`ENVPIPE_KMS_KEY_ID=alias/tenant-{header:tenant}`) is filled per record from
a header's UTF-8 value or from the record key. Filled values are limited to letters, digits
and `._-`, so a record cannot steer its key into another namespace (`../`, `:`, `/`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.errors import ConfigError, Reason, SealError

__all__ = ["KeyAllowlist", "KeyTemplate"]

_VAULT_VERSIONED = re.compile(r"(vault:[^:]+:[^:]+):\d+")
_PLACEHOLDER = re.compile(r"\{(key|header:[^{}]+)\}")
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.-]{1,128}")

Headers = Sequence[tuple[str, bytes]]


class KeyAllowlist:
    """The canonical key ids a reader accepts (see the module docstring for the two rules)."""

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, entries: Iterable[str]) -> None:
        listed = list(entries)
        self._exact = frozenset(entry for entry in listed if not entry.endswith("*"))
        self._prefixes = tuple(entry[:-1] for entry in listed if entry.endswith("*"))

    def __contains__(self, key_id: object) -> bool:
        if not isinstance(key_id, str):
            return False
        if key_id in self._exact or key_id.startswith(self._prefixes):
            return True
        versioned = _VAULT_VERSIONED.fullmatch(key_id)
        return versioned is not None and versioned[1] in self._exact

    def __bool__(self) -> bool:
        return bool(self._exact or self._prefixes)

    def entries(self) -> list[str]:
        """The entries as configured (sorted exact ids, then the `*` prefixes)."""
        return sorted(self._exact) + [prefix + "*" for prefix in self._prefixes]

    def __repr__(self) -> str:
        return f"KeyAllowlist({self.entries()!r})"


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    """A configured wrapping-key name, possibly with `{header:NAME}` / `{key}` placeholders."""

    text: str
    parts: tuple[str, ...]  # literals at even indexes, placeholders (without braces) at odd

    @classmethod
    def parse(cls, text: str, setting: str = "ENVPIPE_KMS_KEY_ID") -> KeyTemplate:
        """Split `text` into literals and placeholders; ConfigError for a stray brace."""
        parts = tuple(_PLACEHOLDER.split(text))
        for literal in parts[::2]:
            if "{" in literal or "}" in literal:
                raise ConfigError(
                    setting,
                    f"{text!r} has a brace that is not a placeholder; use {{header:NAME}} "
                    "or {key}",
                )
        return cls(text, parts)

    @property
    def is_fixed(self) -> bool:
        """Whether every record gets the same key (no placeholder)."""
        return len(self.parts) == 1

    @property
    def header_names(self) -> tuple[str, ...]:
        return tuple(part[len("header:") :] for part in self.parts[1::2] if part != "key")

    def fill(self, key: bytes | None, headers: Headers | None) -> str:
        """The key name for one record; `SealError(key_unresolved)` if a placeholder is unfilled.

        A header named twice uses its last value, as Kafka clients read headers by name.
        """
        if self.is_fixed:
            return self.text
        out = [self.parts[0]]
        for index in range(1, len(self.parts), 2):
            out += (_value(self.parts[index], key, headers), self.parts[index + 1])
        return "".join(out)


def _value(placeholder: str, key: bytes | None, headers: Headers | None) -> str:
    raw: bytes | None
    if placeholder == "key":
        raw = key
    else:
        name = placeholder[len("header:") :]
        raw = None
        for header_name, value in headers or ():
            if header_name == name:
                raw = value
    if raw is None:
        raise SealError(Reason.KEY_UNRESOLVED, f": no {{{placeholder}}} in the record")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SealError(Reason.KEY_UNRESOLVED, f": {{{placeholder}}} is not UTF-8") from exc
    if not _SAFE_VALUE.fullmatch(text):
        raise SealError(
            Reason.KEY_UNRESOLVED,
            f": {{{placeholder}}} must be 1-128 letters, digits or ._- characters",
        )
    return text
