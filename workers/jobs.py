"""What a stream worker is asked to do: which topics, which group, when to stop."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Job", "keys_topic_of"]


def keys_topic_of(encrypted_topic: str, configured: str = "") -> str:
    """The v2 keys topic of an encrypted topic: ENVPIPE_KEYS_TOPIC, else `<topic>.keys`."""
    return configured or f"{encrypted_topic}.keys"


@dataclass(frozen=True, slots=True)
class Job:
    """The topics and group of one worker, and its idle stop (None: run until signalled)."""

    source: str
    dest: str
    group: str
    dlq: str | None = None
    stop_when_idle: float | None = None
    #: the v2 keys topic written (headers of `dest`) and read (headers of `source`)
    keys_out: str = ""
    keys_in: str = ""
