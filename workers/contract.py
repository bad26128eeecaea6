"""The record contract: what the workers, the Faust helper, the demo, inspect and the tests
agree on about Kafka records and worker processes. One place for each of these facts.

Headers:
    envpipe.v        the envelope format of an encrypted record (b"1" or b"2"); added when
                     sealing, removed when opening
    envpipe.error    on a dead-lettered record: the reason code (`Reason`)
    envpipe.source   on a dead-lettered record: topic/partition/offset it was read from

A dead letter keeps the original key, value, timestamp and headers; the two headers follow
them. Reason codes are `pipeline.errors.Reason`: opening (`malformed`, `unknown_version`,
`key_not_allowed`, `bad_signature`, `key_unavailable`, `unwrap_failed`, `bad_tag`,
`header_missing`) and sealing (`key_unresolved`, `key_unavailable`, `too_large`,
`seal_failed`). An encrypt dead-letter topic holds plaintext: protect it like the source.

Processes: a worker writes its stats file to `$ENVPIPE_STATS_FILE` on exit, and logs
`ASSIGNED_LOG` followed by its partitions whenever the group assigns some, which tools wait
for before they produce.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pipeline.envelope import VERSION_HEADER_NAME
from pipeline.errors import Reason

__all__ = [
    "ASSIGNED_LOG",
    "ERROR_HEADER",
    "SOURCE_HEADER",
    "STATS_FILE_ENV",
    "VERSION_HEADER_NAME",
    "Headers",
    "Reason",
    "dead_letter_headers",
    "opened_headers",
    "sealed_headers",
    "source_of",
    "version_header",
]

ERROR_HEADER = "envpipe.error"
SOURCE_HEADER = "envpipe.source"
STATS_FILE_ENV = "ENVPIPE_STATS_FILE"
ASSIGNED_LOG = "partitions assigned:"

Headers = Sequence[tuple[str, bytes]]

_VERSIONS = {"v1": (VERSION_HEADER_NAME, b"1"), "v2": (VERSION_HEADER_NAME, b"2")}


def version_header(format_name: str) -> tuple[str, bytes]:
    """`envpipe.v` for a format name ("v1", "v2")."""
    return _VERSIONS[format_name]


def sealed_headers(
    headers: Iterable[tuple[str, bytes]], format_name: str = "v1"
) -> list[tuple[str, bytes]]:
    """The headers of an envelope record: the original ones (any `envpipe.v` dropped, as a
    rewrap re-seals) plus the format's `envpipe.v`."""
    return [*opened_headers(headers), _VERSIONS[format_name]]


def opened_headers(headers: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The headers of an opened record: the original ones without `envpipe.v`."""
    return [header for header in headers if header[0] != VERSION_HEADER_NAME]


def source_of(topic: str, partition: int, offset: int) -> str:
    """The `envpipe.source` value: where a record was read."""
    return f"{topic}/{partition}/{offset}"


def dead_letter_headers(
    headers: Iterable[tuple[str, bytes]], reason: str, source: str
) -> list[tuple[str, bytes]]:
    """The original headers plus `envpipe.error` and `envpipe.source`."""
    return [*headers, (ERROR_HEADER, reason.encode()), (SOURCE_HEADER, source.encode())]
