"""`faust_encrypt`: a minimal Faust agent sealing each event with envpipe's `Encryptor`.

Interim: issue 7 adds `workers/faust_app.py`; once it exists the benchmark should run that
app instead of this one. Until then this agent does what a Faust user would write: one
`async for` over the stream's events, `await encryptor.seal(...)` per event, `send` to the
destination topic with key, timestamp and headers passed through.

It measures itself like the stream workers do (`workers.stats.WorkerStats`, the same stats
JSON): latency is the time the output is acknowledged minus the source record's timestamp.
It stops itself once no event has arrived for `--stop-when-idle` seconds.

Run as `python -m benchmarks.peers.faust_encrypt --source T --dest T2 --group G`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.config import Settings, load_settings
from pipeline.crypto import Encryptor
from pipeline.envelope import VERSION_HEADER
from pipeline.kms.counting import CountingKms
from workers.runtime import open_kms
from workers.stats import WorkerStats

log = logging.getLogger("benchmarks.faust")
_IDLE_CHECK_SECONDS = 0.2


class _Agent:
    """The state one Faust worker shares between its agent and its idle timer."""

    def __init__(self, settings: Settings, stream_name: str, stats_file: Path | None) -> None:
        self.settings = settings
        self.stream_name = stream_name
        self.stats_file = stats_file
        self.stats = WorkerStats("faust_encrypt")
        self.kms: CountingKms | None = None
        self.encryptor: Encryptor | None = None
        self.pending: set[asyncio.Future[Any]] = set()
        self.last_activity = time.monotonic()
        self.stopping = False

    async def ready(self) -> Encryptor:
        if self.encryptor is None:
            self.kms = CountingKms(await open_kms(self.settings))
            self.encryptor = Encryptor.from_settings(
                self.kms, self.settings, stream=self.stream_name
            )
        return self.encryptor

    def acked(self, timestamp_s: float, size_in: int, size_out: int, future: Any) -> None:
        """The output of one event is acknowledged: record it like the stream workers do."""
        self.pending.discard(future)
        if future.cancelled() or future.exception() is not None:
            return
        stats = self.stats
        stats.records_out += 1
        stats.overhead_bytes += size_out - size_in
        stats.overhead_records += 1
        stats.latency_ms.add(time.time() * 1000 - timestamp_s * 1000)
        stats.last_ack = time.monotonic()

    async def finish(self) -> None:
        """Wait for outstanding acknowledgements, write the stats, close the KMS client."""
        if self.pending:
            await asyncio.wait(self.pending, timeout=30)
        if self.encryptor is not None:
            await self.encryptor.close()
        if self.stats_file is not None:
            kms_calls = self.kms.calls if self.kms is not None else None
            cache = self.encryptor.cache.stats if self.encryptor is not None else None
            document = self.stats.as_json(kms_calls or _empty(), cache or _empty())
            self.stats_file.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        if self.kms is not None:
            await self.kms.close()


def _empty() -> Any:
    from collections import Counter  # noqa: PLC0415 - only for an empty stats field

    return Counter()


def build_app(args: argparse.Namespace, settings: Settings) -> Any:
    """The Faust app: raw bytes in and out, acks=all, no web server, in-memory tables."""
    import faust  # noqa: PLC0415 - an optional peer; imported only in its own process

    app = faust.App(
        args.group,
        broker=f"kafka://{settings.bootstrap_servers}",
        key_serializer="raw",
        value_serializer="raw",
        producer_acks=-1,
        producer_linger=settings.linger_ms / 1000,
        producer_max_batch_size=settings.producer_max_batch_bytes,
        consumer_auto_offset_reset="earliest",
        # aiokafka's defaults, as the stream workers use them: Faust's 60 s make the group
        # join wait 30 s on the embedded broker.
        broker_session_timeout=10.0,
        broker_rebalance_timeout=10.0,
        datadir=tempfile.mkdtemp(prefix="envpipe-bench-faust-"),  # not the working directory
        topic_replication_factor=1,
        topic_partitions=3,
        web_enabled=False,
        store="memory://",
    )
    state = _Agent(settings, args.source, Path(args.stats) if args.stats else None)
    source = app.topic(args.source)
    dest = app.topic(args.dest)

    @app.agent(source)
    async def seal(stream: Any) -> AsyncIterator[None]:
        encryptor = await state.ready()
        async for event in stream.events():
            state.last_activity = time.monotonic()
            state.stats.fetched(1)
            message = event.message
            value = event.value
            if value is None:
                continue
            sealed = await encryptor.seal(value, message.key)
            future: Any = await dest.send(
                key=message.key,
                value=sealed,
                timestamp=message.timestamp,
                headers=[*(message.headers or []), VERSION_HEADER],
            )
            state.pending.add(future)
            future.add_done_callback(
                partial(state.acked, message.timestamp, len(value), len(sealed))
            )
            yield None

    @app.timer(_IDLE_CHECK_SECONDS)  # type: ignore[untyped-decorator]
    async def stop_when_idle() -> None:
        idle = args.stop_when_idle
        if (
            idle is None
            or state.stopping
            or state.stats.records_in == 0
            or time.monotonic() - state.last_activity < idle
        ):
            return
        state.stopping = True
        await state.finish()
        os.kill(os.getpid(), signal.SIGTERM)  # Faust's own graceful shutdown

    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Faust worker in this process until it stops itself (or is signalled)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.faust_encrypt")
    parser.add_argument("--source", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--stop-when-idle", type=float, default=None)
    parser.add_argument("--stats", default=os.environ.get("ENVPIPE_STATS_FILE"))
    args = parser.parse_args(argv)
    try:
        import faust  # noqa: PLC0415 - an optional peer
    except ImportError as exc:
        print(f"faust-streaming is not installed ({exc}): pip install 'envpipe[bench]'")
        return 2
    app = build_app(args, load_settings())

    loglevel = os.environ.get("BENCH_FAUST_LOGLEVEL", "WARNING")
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
