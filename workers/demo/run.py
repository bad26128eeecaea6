"""The demo's run: two worker processes, the producer, the progress line, the drain.

The workers are started exactly as a user would start them (`python -m workers.cli encrypt
...`, configured by dev.env), through the one process supervisor, so the throughput and
latency figures are the workers' own, from their stats files.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition

from pipeline.errors import DemoError
from workers import topics
from workers.contract import ASSIGNED_LOG, STATS_FILE_ENV
from workers.demo.report import Produced
from workers.demo.samples import PARTITIONS, Topics, sample_records
from workers.supervisor import Child, until

__all__ = ["DemoWorker", "run_pipeline", "say", "start_workers"]

#: A safety net only: the demo stops the workers (SIGTERM: drain, commit, exit) as soon as
#: every record has come through, but a worker left behind by a killed demo exits on its own.
IDLE_SECONDS = 20.0
_JOIN_SECONDS = 60.0
_STOP_GRACE = 15.0


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


@dataclass
class DemoWorker:
    """One worker process started by the demo, and its stats file."""

    direction: str
    child: Child
    stats_file: Path

    @classmethod
    def start(
        cls, direction: str, args: Sequence[str], environ: Mapping[str, str], folder: Path
    ) -> DemoWorker:
        """`python -m workers.cli DIRECTION ARGS --stop-when-idle S`, stats file by env."""
        stats_file = folder / f"{direction}-stats.json"
        stats_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "workers.cli", direction, *args]
        argv += ["--stop-when-idle", f"{IDLE_SECONDS:g}"]
        child = Child.spawn(
            argv,
            name=f"the {direction} worker",
            log=folder / f"{direction}.log",
            env={**environ, STATS_FILE_ENV: str(stats_file)},
        )
        return cls(direction, child, stats_file)

    def joined(self) -> bool:
        """Whether the worker's log says its consumer group gave it partitions."""
        return any(
            line.partition(ASSIGNED_LOG)[2].strip() not in ("", "none")
            for line in self.child.log_text().splitlines()
            if ASSIGNED_LOG in line
        )

    def check(self) -> None:
        """Raise DemoError if the worker has exited with an error."""
        code = self.child.poll()
        if code not in (None, 0):
            raise DemoError(
                f"the {self.direction} worker exited with code {code}; {self.child.tail()}"
            )

    async def stop(self) -> None:
        """SIGTERM (the worker drains, commits, writes its stats), then SIGKILL if it hangs."""
        await self.child.stop(_STOP_GRACE)

    def stats(self) -> dict[str, Any] | None:
        """The worker's stats file, or None if it wrote none."""
        try:
            loaded = orjson.loads(self.stats_file.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return loaded if isinstance(loaded, dict) else None


def start_workers(names: Topics, environ: Mapping[str, str], folder: Path) -> list[DemoWorker]:
    """The encrypt and decrypt workers, configured by `environ` (dev.env's variables)."""
    environ = {name: value for name, value in environ.items() if name != STATS_FILE_ENV}
    encrypt = ["--source", names.source, "--dest", names.encrypted, "--group", "demo-encrypt"]
    decrypt = [*("--source", names.encrypted, "--dest", names.decrypted)]
    decrypt += ["--group", "demo-decrypt", "--dlq", names.dlq]
    return [
        DemoWorker.start("encrypt", encrypt, environ, folder),
        DemoWorker.start("decrypt", decrypt, environ, folder),
    ]


class _Watch:
    """Counts what reaches the output topics, for the progress line and the finish."""

    def __init__(self, kafka: Any, names: Topics) -> None:
        self.kafka = kafka
        self.names = names
        self.counts: Counter[str] = Counter()

    async def follow(self) -> None:
        """Count the decrypted and DLQ topics' records (not the encrypted: it costs CPU)."""
        partitions = [
            TopicPartition(topic, partition)
            for topic in (self.names.decrypted, self.names.dlq)
            for partition in range(PARTITIONS)
        ]
        self.kafka.assign(partitions)
        await self.kafka.seek_to_beginning(*partitions)
        while True:
            fetched = await self.kafka.getmany(timeout_ms=200)
            for tp, records in fetched.items():
                self.counts[tp.topic] += len(records)

    @property
    def finished(self) -> int:
        """Records that have left the pipeline: decrypted or dead-lettered."""
        return self.counts[self.names.decrypted] + self.counts[self.names.dlq]


@dataclass
class _Status:
    """The progress line on stderr: rewritten in place on a terminal, else every 5 seconds."""

    count: int
    produced: Produced
    watch: _Watch
    phase: str = "waiting for the workers to join their consumer groups"
    width: int = 0

    @property
    def tty(self) -> bool:
        return sys.stderr.isatty()

    def show(self) -> None:
        counts, names = self.watch.counts, self.watch.names
        text = (
            f"{self.phase} | produced {self.produced.records:,}/{self.count:,} | "
            f"decrypted {counts[names.decrypted]:,} | dead-lettered {counts[names.dlq]:,}"
        )
        if self.tty:
            sys.stderr.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            sys.stderr.write(f"demo: {text}\n")
        sys.stderr.flush()

    async def keep_showing(self) -> None:
        while True:
            await asyncio.sleep(1.0 if self.tty else 5.0)
            self.show()

    def close(self) -> None:
        self.show()
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def run_pipeline(
    bootstrap_servers: str, names: Topics, count: int, workers: Sequence[DemoWorker]
) -> Produced:
    """Produce while the workers run and wait until every record has come out the far end.

    Production starts once both workers hold their partitions, so the latency figures are
    the pipeline's and not the time two consumer groups take to form.
    """
    produced = Produced()
    async with topics.consumer(bootstrap_servers, client_id="envpipe-demo-watch") as kafka:
        watch = _Watch(kafka, names)
        status = _Status(count, produced, watch)
        background = [
            asyncio.create_task(watch.follow()),
            asyncio.create_task(status.keep_showing()),
        ]
        try:
            if not await _until(lambda: all(w.joined() for w in workers), _JOIN_SECONDS, workers):
                say(f"no partition assignment logged within {_JOIN_SECONDS:g} s; producing anyway")
            status.phase = "producing"
            await _produce(bootstrap_servers, names.source, count, produced, workers)
            status.phase = "draining"
            drain_seconds = max(60.0, count / 1_000)
            if not await _until(lambda: watch.finished >= count, drain_seconds, workers):
                raise DemoError(
                    f"only {watch.finished:,} of {count:,} records came through within "
                    f"{drain_seconds:g} s; " + "; ".join(w.child.tail() for w in workers)
                )
            status.phase = "done"
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            status.close()
    return produced


async def _produce(
    bootstrap_servers: str,
    topic: str,
    count: int,
    produced: Produced,
    workers: Sequence[DemoWorker],
) -> None:
    """Send the sample records (acks=all) and wait until the broker has acknowledged all."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id="envpipe-demo-producer",
        acks="all",
        linger_ms=5,
    )
    await producer.start()
    try:
        started = time.monotonic()
        sent: list[asyncio.Future[Any]] = []
        for key, value, headers in sample_records(count):
            sent.append(await producer.send(topic, value, key=key, headers=list(headers)))
            produced.records += 1
            produced.tombstones += value is None
            produced.null_keys += key is None
            if produced.records % 1_000 == 0:
                _check(workers)
                await asyncio.sleep(0)  # let the watcher and the progress line run
        await asyncio.gather(*sent)
        produced.seconds = time.monotonic() - started
    finally:
        await producer.stop()


def _check(workers: Sequence[DemoWorker]) -> None:
    """Raise DemoError if a worker has exited before the demo stopped it."""
    for worker in workers:
        worker.check()
        if not worker.child.running:
            raise DemoError(
                f"the {worker.direction} worker stopped before the run was complete; "
                + worker.child.tail()
            )


async def _until(
    condition: Callable[[], bool], seconds: float, workers: Sequence[DemoWorker]
) -> bool:
    """Poll `condition` until it holds (True) or `seconds` pass (False); workers must live."""

    def holds() -> bool:
        _check(workers)
        return condition()

    return await until(holds, seconds, interval=0.1)


def worker_environ(variables: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus dev.env's variables."""
    return {**os.environ, **variables}
