"""RFC 7512 `pkcs11:` URIs: parse a configured key name, produce the canonical id. No IO.

A URI is `pkcs11:` then path attributes separated by `;` (`token=...;object=...;type=...`),
optionally `?` and query attributes separated by `&` (`module-path=...&pin-source=...`).
Values are percent-encoded UTF-8 (`id` is raw bytes, so every byte is encoded). Parsing is
lenient about characters RFC 7512 wants encoded (a space, say) but strict about what changes
the meaning: a malformed `%` escape, a duplicate path attribute, an attribute without `=`,
an unknown `type`, or a name outside RFC 7512's vendor-attribute alphabet is an error.
Unknown (vendor) attributes are kept, in order, for the caller to honour or refuse.

envpipe's canonical ids are fixed by the contract (docs/pkcs11.md): exactly
`token`, `object` and `type`, in that order, with `type=secret-key` for a wrapping key and
`type=private-key` for a signing key. RFC 7512 spells the latter `private`; both spellings
are accepted when parsing, and `private-key` is always produced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "OBJECT_TYPES",
    "SCHEME",
    "Pkcs11Uri",
    "Pkcs11UriError",
    "canonical_key_uri",
    "format_uri",
    "parse_uri",
    "percent_decode",
    "percent_encode",
]

SCHEME = "pkcs11:"

#: `type=` values: RFC 7512's, plus envpipe's contract spelling `private-key`.
OBJECT_TYPES = frozenset({"public", "private", "private-key", "cert", "secret-key", "data"})

_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_RES_AVAIL = ":[]@!$'()*+,="
#: Characters RFC 7512 lets a path value (pk11-pchar) or a query value (pk11-qchar) hold raw.
_PATH_SAFE = frozenset((_UNRESERVED + _RES_AVAIL + "&").encode("ascii"))
_QUERY_SAFE = frozenset((_UNRESERVED + _RES_AVAIL + "/?|").encode("ascii"))
#: pk11-v-attr-nm-char: what a (vendor) attribute name may consist of.
_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
_HEX = frozenset("0123456789abcdefABCDEF")
#: Attributes whose value is binary, not UTF-8 text.
_BINARY = frozenset({"id"})


class Pkcs11UriError(ValueError):
    """A string that is not a usable `pkcs11:` URI; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """A parsed URI: path and query attributes, in order, values decoded.

    Text values are `str`; `id` (CKA_ID) is `bytes`. Lookups return None when absent.
    """

    path: tuple[tuple[str, str | bytes], ...] = ()
    query: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | bytes | None:
        """The path attribute `name`, or None."""
        for key, value in self.path:
            if key == name:
                return value
        return None

    def _text(self, name: str) -> str | None:
        value = self.get(name)
        return value if isinstance(value, str) else None

    @property
    def token(self) -> str | None:
        """The token label (CKA_LABEL of the token, `token=`)."""
        return self._text("token")

    @property
    def object(self) -> str | None:
        """The object label (CKA_LABEL, `object=`)."""
        return self._text("object")

    @property
    def type(self) -> str | None:
        """The object class (`type=`): one of `OBJECT_TYPES`."""
        return self._text("type")

    @property
    def id(self) -> bytes | None:
        """The object's CKA_ID (`id=`), as bytes."""
        value = self.get("id")
        return value if isinstance(value, bytes) else None

    def query_value(self, name: str) -> str | None:
        """The first query attribute `name` (`module-path`, `pin-source`, ...), or None."""
        for key, value in self.query:
            if key == name:
                return value
        return None

    def extra_path_attributes(self, known: Iterable[str]) -> tuple[str, ...]:
        """Names of path attributes outside `known`, for a caller that refuses them."""
        allowed = frozenset(known)
        return tuple(key for key, _ in self.path if key not in allowed)

    def __str__(self) -> str:
        return format_uri(self.path, self.query)


def percent_encode(data: bytes, *, safe: frozenset[int] = _PATH_SAFE) -> str:
    """Every byte outside `safe` as `%XX` (upper-case hex, as RFC 3986 recommends)."""
    return "".join(chr(byte) if byte in safe else f"%{byte:02X}" for byte in data)


def percent_decode(text: str) -> bytes:
    """The bytes of a percent-encoded value; a `%` not followed by two hex digits is an error."""
    out = bytearray()
    index = 0
    while index < len(text):
        char = text[index]
        if char == "%":
            escape = text[index + 1 : index + 3]
            if len(escape) != 2 or not set(escape) <= _HEX:
                raise Pkcs11UriError(f"bad percent-encoding {text[index : index + 3]!r}")
            out.append(int(escape, 16))
            index += 3
        else:
            out += char.encode("utf-8")
            index += 1
    return bytes(out)


def _split(part: str, separator: str, where: str) -> list[tuple[str, bytes]]:
    """`name=value` pairs of one component, values decoded to bytes."""
    pairs = []
    for item in part.split(separator):
        if not item:
            continue  # tolerate `pkcs11:token=a;` and an empty query
        name, equals, raw = item.partition("=")
        if not equals:
            raise Pkcs11UriError(f"{where} attribute {item!r} has no '='")
        if not _NAME.match(name):
            raise Pkcs11UriError(f"{where} attribute name {name!r} is not valid")
        pairs.append((name, percent_decode(raw)))
    return pairs


def _text_value(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Pkcs11UriError(f"attribute {name!r} is not UTF-8 after percent-decoding") from exc


def parse_uri(text: str) -> Pkcs11Uri:
    """Parse `pkcs11:...`; raises Pkcs11UriError naming the problem (never echoing a PIN)."""
    if not text.startswith(SCHEME):
        raise Pkcs11UriError("not a pkcs11: URI (it must start with 'pkcs11:')")
    path_part, _, query_part = text[len(SCHEME) :].partition("?")
    path: list[tuple[str, str | bytes]] = []
    seen: set[str] = set()
    for name, raw in _split(path_part, ";", "path"):
        if name in seen:
            raise Pkcs11UriError(f"path attribute {name!r} appears twice")
        seen.add(name)
        value: str | bytes = raw if name in _BINARY else _text_value(name, raw)
        if name == "type" and value not in OBJECT_TYPES:
            raise Pkcs11UriError(f"type={value!r} is not one of {', '.join(sorted(OBJECT_TYPES))}")
        path.append((name, value))
    query = tuple((name, _text_value(name, raw)) for name, raw in _split(query_part, "&", "query"))
    return Pkcs11Uri(tuple(path), query)


def format_uri(
    path: Iterable[tuple[str, str | bytes]], query: Iterable[tuple[str, str]] = ()
) -> str:
    """The URI for these attributes, in this order, each value percent-encoded as needed."""
    parts = []
    for name, value in path:
        if not _NAME.match(name):
            raise Pkcs11UriError(f"path attribute name {name!r} is not valid")
        if isinstance(value, bytes):  # binary (id): every byte encoded, as RFC 7512 advises
            parts.append(f"{name}={percent_encode(value, safe=frozenset())}")
        else:
            parts.append(f"{name}={percent_encode(value.encode('utf-8'))}")
    text = SCHEME + ";".join(parts)
    queries = []
    for name, text_value in query:
        if not _NAME.match(name):
            raise Pkcs11UriError(f"query attribute name {name!r} is not valid")
        queries.append(f"{name}={percent_encode(text_value.encode('utf-8'), safe=_QUERY_SAFE)}")
    return f"{text}?{'&'.join(queries)}" if queries else text


def canonical_key_uri(token: str, label: str, object_type: str) -> str:
    """envpipe's canonical key id: `pkcs11:token=<t>;object=<l>;type=<type>`, nothing else."""
    if object_type not in ("secret-key", "private-key"):
        raise Pkcs11UriError(f"canonical ids name a secret-key or a private-key, not {object_type}")
    if not token or not label:
        raise Pkcs11UriError("a canonical id needs a token label and an object label")
    return format_uri((("token", token), ("object", label), ("type", object_type)))
