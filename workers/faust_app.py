"""A ready Faust app with envpipe's encrypt and decrypt workers as agents.

    faust -A workers.faust_app worker -l info

It reads the same settings as `envpipe encrypt` / `envpipe decrypt` (`ENVPIPE_*` variables,
then the TOML file in `ENVPIPE_CONFIG`; the broker is `ENVPIPE_BOOTSTRAP_SERVERS`) and its
topics from these variables:

    ENVPIPE_FAUST_SOURCE     plaintext topic; if set, the encrypt agent seals it into ENCRYPTED
    ENVPIPE_FAUST_ENCRYPTED  envelope topic (required)
    ENVPIPE_FAUST_CLEAR      if set, the decrypt agent opens ENCRYPTED into it (needs DLQ)
    ENVPIPE_FAUST_DLQ        dead-letter topic of the decrypt agent
    ENVPIPE_FAUST_STREAM     stream name in the encryption context [the source topic]
    ENVPIPE_FAUST_APP_ID     Faust app id = consumer group [envpipe-faust]
    ENVPIPE_FAUST_STOP_WHEN_IDLE  seconds without a new event after which the worker stops
                             cleanly (exit 0), like `envpipe encrypt --stop-when-idle`

With `ENVPIPE_STATS_FILE=PATH` the worker writes, on shutdown, the same stats JSON as the
envpipe workers (`workers.stats.WorkerStats`): records in and out, dead letters, latency at
acknowledgement, KMS calls and cache events, for both agents together.

The envelopes are the same v1 bytes `envpipe encrypt` writes, so either side opens the
other's. The agents run without exactly-once and without an idempotent producer (the
embedded Tansu broker refuses both), without tables, the leader topic or the web server:
they need only the topics above and a consumer group.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faust
from faust.app.base import BootStrategy
from faust.types import StreamT, TopicT
from mode.types.signals import BaseSignalT

from pipeline.config import MIB, Settings, load_settings
from pipeline.errors import ConfigError
from workers.contract import STATS_FILE_ENV
from workers.faust_helpers import AgentCrypto
from workers.jobs import keys_topic_of
from workers.kafka_access import KafkaAccess
from workers.topics import ensure_outputs

__all__ = ["FaustTopics", "create_app"]  # and `app`, made on first access

FAUST_ENV_PREFIX = "ENVPIPE_FAUST_"
DEFAULT_APP_ID = "envpipe-faust"
#: Tansu answers a group join after half the session timeout; Faust's default is 60 s.
_SESSION_TIMEOUT_SECONDS = 10.0
#: How often the idle stop looks at the time of the latest event.
_IDLE_CHECK_SECONDS = 0.2

log = logging.getLogger("envpipe.faust")


@dataclass(frozen=True, slots=True)
class FaustTopics:
    """What the app reads and writes; an agent runs only if its topics are named."""

    encrypted: str
    source: str = ""
    clear: str = ""
    dlq: str = ""
    stream: str = ""
    app_id: str = DEFAULT_APP_ID
    #: stop cleanly after this many seconds without a new event (None: run until signalled)
    stop_when_idle: float | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> FaustTopics:
        """Read the ENVPIPE_FAUST_* variables; a ConfigError names what is missing."""

        def get(name: str) -> str:
            return environ.get(FAUST_ENV_PREFIX + name, "").strip()

        topics = cls(
            encrypted=get("ENCRYPTED"),
            source=get("SOURCE"),
            clear=get("CLEAR"),
            dlq=get("DLQ"),
            stream=get("STREAM"),
            app_id=get("APP_ID") or DEFAULT_APP_ID,
            stop_when_idle=_seconds("ENVPIPE_FAUST_STOP_WHEN_IDLE", get("STOP_WHEN_IDLE")),
        )
        if not topics.encrypted:
            raise ConfigError("ENVPIPE_FAUST_ENCRYPTED", "must name the envelope topic")
        if not (topics.source or topics.clear):
            raise ConfigError(
                "ENVPIPE_FAUST_SOURCE",
                "set it (encrypt agent) or ENVPIPE_FAUST_CLEAR (decrypt agent), or both",
            )
        if topics.clear and not topics.dlq:
            raise ConfigError("ENVPIPE_FAUST_DLQ", "the decrypt agent needs a dead-letter topic")
        return topics


def _seconds(name: str, text: str) -> float | None:
    """A positive number of seconds, or None if unset; a ConfigError names the variable."""
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(name, f"must be a positive number of seconds, not {text!r}")
    return seconds


class _WithoutWeb(BootStrategy):
    """No web server, whatever the worker command says.

    `faust ... worker` turns Faust's web server on unless given `--without-web`; it binds
    port 6066, so a second worker on the same machine would fail to start.
    """

    enable_web = False


class _EnvpipeApp(faust.App):
    """A Faust app that creates missing output topics like their input, before consuming.

    It also writes the stats file on shutdown, after the producer has flushed (so every
    acknowledgement is counted), and stops itself once idle if told to.
    """

    BootStrategy = _WithoutWeb

    envpipe_settings: Settings
    envpipe_kafka: KafkaAccess
    envpipe_outputs: list[tuple[str, list[str]]]
    envpipe_crypto: AgentCrypto
    envpipe_stats_file: Path | None
    #: `time.monotonic()` of the latest partition assignment (None before the first)
    envpipe_assigned_at: float | None
    envpipe_stopping: bool

    async def on_first_start(self) -> None:
        await super().on_first_start()
        for source, targets in self.envpipe_outputs:
            await ensure_outputs(self.envpipe_kafka, source, targets)

    async def on_shutdown(self) -> None:
        await super().on_shutdown()
        stats = self.envpipe_crypto.stats
        log.info("%s", stats.summary_line())
        if self.envpipe_stats_file is not None:
            crypto = self.envpipe_crypto
            try:
                stats.write(self.envpipe_stats_file, crypto.kms_calls, crypto.cache_stats)
            except OSError as exc:
                log.warning("cannot write the stats file %s: %s", self.envpipe_stats_file, exc)

    def envpipe_idle_for(self) -> float | None:
        """Seconds since the latest event or partition assignment; None before either."""
        moments = [m for m in (self.envpipe_crypto.last_event, self.envpipe_assigned_at) if m]
        return time.monotonic() - max(moments) if moments else None


def create_app(settings: Settings, topics: FaustTopics) -> faust.App:
    """The Faust app for these settings and topics, with one agent per direction named."""
    kafka = KafkaAccess.from_settings(settings)
    app: _EnvpipeApp = _EnvpipeApp(
        topics.app_id,
        broker=[f"kafka://{server.strip()}" for server in settings.bootstrap_servers.split(",")],
        broker_credentials=kafka.ssl_context,  # None: plaintext
        key_serializer="raw",
        value_serializer="raw",
        processing_guarantee="at_least_once",
        topic_disable_leader=True,
        web_enabled=False,
        autodiscover=False,
        store="memory://",
        datadir=_datadir(topics.app_id),
        broker_session_timeout=_SESSION_TIMEOUT_SECONDS,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_max_poll_records=settings.batch_max_records,
        stream_buffer_maxsize=settings.max_inflight_records,
        producer_linger=settings.linger_ms / 1000,
        producer_max_batch_size=settings.producer_max_batch_bytes,
        producer_max_request_size=max(MIB, settings.producer_max_batch_bytes),
        producer_compression_type=None if settings.compression == "none" else settings.compression,
    )
    app.envpipe_settings = settings
    app.envpipe_kafka = kafka
    app.envpipe_outputs = []
    direction = "+".join(
        name for name, on in (("encrypt", topics.source), ("decrypt", topics.clear)) if on
    )
    crypto = AgentCrypto(
        settings,
        stream=topics.stream or None,
        direction=direction,
        keys_topic=keys_topic_of(topics.encrypted, settings.keys_topic),
    )
    app.envpipe_crypto = crypto
    stats_file = os.environ.get(STATS_FILE_ENV) or None
    app.envpipe_stats_file = Path(stats_file) if stats_file else None
    app.envpipe_assigned_at = None
    app.envpipe_stopping = False
    _count_assignments(app)
    if topics.stop_when_idle is not None:
        _stop_when_idle(app, topics.stop_when_idle)
    encrypted = _raw_topic(app, topics.encrypted)
    if topics.source:
        app.envpipe_outputs.append((topics.source, [topics.encrypted]))

        @app.agent(_raw_topic(app, topics.source), name="envpipe-encrypt")
        async def encrypt(stream: StreamT[bytes]) -> None:
            async for event in _noack(stream).events():  # acked by the helper once written
                await crypto.seal_to(encrypted, event)

    if topics.clear:
        clear, dlq = _raw_topic(app, topics.clear), _raw_topic(app, topics.dlq)
        app.envpipe_outputs.append((topics.encrypted, [topics.clear, topics.dlq]))

        @app.agent(encrypted, name="envpipe-decrypt")
        async def decrypt(stream: StreamT[bytes]) -> None:
            async for event in _noack(stream).events():
                await crypto.open_to(clear, event, dlq=dlq)

    return app


def _count_assignments(app: _EnvpipeApp) -> None:
    """Note assigned partitions in the stats; an assignment restarts the idle clock."""

    async def assigned(
        sender: Any, /, *args: Any, signal: BaseSignalT[Any], **_: Any
    ) -> None:  # called as (app, assigned partitions)
        app.envpipe_assigned_at = time.monotonic()
        partitions = app.envpipe_crypto.stats.assigned_partitions
        partitions.update(f"{tp.topic}/{tp.partition}" for tp in (args[0] if args else ()))

    app.on_partitions_assigned.connect(assigned)


def _stop_when_idle(app: _EnvpipeApp, seconds: float) -> None:
    """Stop the worker as SIGTERM does (drain, commit, exit 0) after `seconds` without events.

    The clock starts at the first partition assignment, so a slow group join does not count.
    """

    @app.timer(_IDLE_CHECK_SECONDS)  # type: ignore[untyped-decorator]
    async def stop_when_idle() -> None:
        idle = app.envpipe_idle_for()
        if app.envpipe_stopping or idle is None or idle < seconds:
            return
        app.envpipe_stopping = True
        log.info("stopping (no event for %gs)", seconds)
        os.kill(os.getpid(), signal.SIGTERM)  # the worker's own graceful shutdown


def _noack(stream: StreamT[bytes]) -> StreamT[Any]:
    """The stream with acknowledgement left to the helper, which acks once the output is written."""
    return cast("faust.Stream[bytes]", stream).noack()


def _raw_topic(app: faust.App, name: str) -> TopicT:
    return app.topic(name, key_type=bytes, value_type=bytes)


def _datadir(app_id: str) -> str:
    """The app keeps no state, so its data dir goes to the temp dir unless Faust is told."""
    return (
        os.environ.get("FAUST_DATADIR")
        or os.environ.get("F_DATADIR")
        or str(Path(tempfile.gettempdir()) / f"{app_id}-data")
    )


def __getattr__(name: str) -> faust.App:
    """`app`, made on first access (what `faust -A` does), so importing this module is free."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        made = create_app(load_settings(), FaustTopics.from_environ(os.environ))
    except ConfigError as exc:
        sys.exit(f"envpipe: error: {exc}")
    globals()["app"] = made
    return made
