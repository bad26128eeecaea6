"""`envpipe demo`: the whole path on the embedded broker and KMS, then a summary with sources.

The workers run as separate processes, started exactly as a user would start them, so the
throughput and latency figures are the workers' own (from their stats files), not the
demo's estimate. The demo itself only produces sample orders, watches progress, reads every
topic back to verify, and times the library in-process to show the per-record cost of
sealing and opening without Kafka around it. Every figure in the summary names its source.

The embedded services are stopped whatever happens: on success, on failure, on Ctrl-C and
on SIGTERM (which is treated as Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition

from pipeline.config import load_settings
from pipeline.crypto import Decryptor, Encryptor
from pipeline.envelope import VERSION_HEADER, decode_header
from pipeline.errors import DecryptionError, EnvpipeError
from pipeline.kms.aws import AwsKms
from pipeline.kms.counting import CountingKms
from workers import dev, runtime, topics
from workers.stats import Histogram
from workers.stream import ASSIGNED_LOG, STATS_FILE_ENV

__all__ = ["DemoError", "Report", "Verification", "render", "run", "sample_records"]

PARTITIONS = 3
#: A safety net only: the demo stops the workers (SIGTERM: drain, commit, exit) as soon as
#: every record has come through, but a worker left behind by a killed demo exits on its own.
IDLE_SECONDS = 20.0
#: Records timed one by one through Encryptor.seal / Decryptor.open in this process.
CRYPTO_STAGE_RECORDS = 5_000
_JOIN_SECONDS = 60.0
_STOP_GRACE = 15.0
_LOG_TAIL_LINES = 15
#: Every sample order value contains this; no encrypted value may.
PLAINTEXT_MARKER = b'"order_id":"ord-'

Headers = tuple[tuple[str, bytes], ...]
Record = tuple[bytes | None, bytes | None, Headers]  # key, value, headers


class DemoError(EnvpipeError):
    """The demo could not run to the end (a worker died or never finished)."""


@dataclass(frozen=True)
class Topics:
    """The demo's four topics."""

    source: str = "demo.orders"
    encrypted: str = "demo.orders.enc"
    decrypted: str = "demo.orders.dec"
    dlq: str = "demo.orders.dlq"

    @property
    def all(self) -> tuple[str, str, str, str]:
        return (self.source, self.encrypted, self.decrypted, self.dlq)


def sample_records(count: int, *, seed: int = 2024) -> Iterator[Record]:
    """Deterministic JSON orders keyed by customer; 1% null keys, every 1,000th a tombstone.

    Nine in ten records carry headers (content type, a trace id), so the check that headers
    pass through unchanged has something to compare.
    """
    rng = random.Random(seed)  # noqa: S311 - sample data, not cryptography
    for n in range(count):
        customer = f"cust-{rng.randrange(5_000):05d}"
        headers: Headers = (
            ()
            if n % 10 == 7
            else (
                ("content-type", b"application/json"),
                ("trace-id", rng.randbytes(8).hex().encode()),
            )
        )
        if n % 1_000 == 999:
            yield customer.encode(), None, headers
            continue
        lines = [
            (f"SKU-{rng.randrange(10_000):05d}", rng.randint(1, 5), rng.randrange(199, 19_999))
            for _ in range(rng.randint(1, 4))
        ]
        order = {
            "order_id": f"ord-{n:07d}",
            "customer": customer,
            "items": [{"sku": sku, "qty": qty, "price_cents": price} for sku, qty, price in lines],
            "total_cents": sum(qty * price for _, qty, price in lines),
            "currency": "EUR",
            "status": "placed",
        }
        yield (None if n % 100 == 42 else customer.encode()), orjson.dumps(order), headers


# --- the command --------------------------------------------------------------------------


def run(*, records: int, state_dir: Path | None) -> int:
    """The `demo` command: 0 only if every record came back intact; 128 + N on signal N."""
    runtime.configure_logging("WARNING")
    started = time.monotonic()
    _interrupted_by.clear()
    folder = state_dir or Path(tempfile.mkdtemp(prefix="envpipe-demo-"))
    previous = signal.signal(signal.SIGTERM, _as_interrupt)
    passed = False
    try:
        _say(f"starting the embedded broker (Tansu) and KMS (moto); state in {folder}")
        env = dev.up(folder)
        try:
            _say(
                f"broker {env.bootstrap_servers} (pid {env.broker_pid}), "
                f"KMS {env.kms_endpoint} (pid {env.kms_pid})"
            )
            report = runtime.run(_demo(env, folder, records))
            report.wall_seconds = time.monotonic() - started
            report.kept = state_dir is not None or not report.verification.passed
            print(render(report), flush=True)
            passed = report.verification.passed
        finally:
            _stop_services(folder)
    except KeyboardInterrupt:
        _say("interrupted; the embedded services are stopped")
        return 128 + _interrupted_by[-1] if _interrupted_by else 128 + signal.SIGINT
    except EnvpipeError as exc:
        print(f"envpipe: error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        if passed and state_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        elif not passed:
            _say(f"logs and stats kept in {folder}")
    return 0 if passed else 1


_interrupted_by: list[int] = []  # the signals `_as_interrupt` saw during this run


def _as_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM acts as Ctrl-C, so the `finally` that stops the services always runs."""
    _interrupted_by.append(signum)
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)  # inside the event loop: cancels the demo task


def _stop_services(folder: Path) -> None:
    """`dev.down`, shielded from a second Ctrl-C so the services cannot be left behind."""
    _say("stopping the embedded services")
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        dev.down(folder)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


# --- the run ---------------------------------------------------------------------------


@dataclass
class Worker:
    """One worker process started by the demo, its log and its stats file."""

    direction: str
    process: asyncio.subprocess.Process
    log: Path
    stats_file: Path

    @classmethod
    async def start(
        cls, direction: str, args: Sequence[str], environ: Mapping[str, str], folder: Path
    ) -> Worker:
        """`python -m workers.cli DIRECTION ARGS --stop-when-idle S`, stats file by env."""
        log, stats_file = folder / f"{direction}.log", folder / f"{direction}-stats.json"
        stats_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "workers.cli", direction, *args]
        argv += ["--stop-when-idle", f"{IDLE_SECONDS:g}"]
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env={**environ, STATS_FILE_ENV: str(stats_file)},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        return cls(direction, process, log, stats_file)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def joined(self) -> bool:
        """Whether the worker's log says its consumer group gave it partitions."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return False
        return any(
            line.partition(ASSIGNED_LOG)[2].strip() not in ("", "none")
            for line in text.splitlines()
            if ASSIGNED_LOG in line
        )

    def check(self) -> None:
        """Raise DemoError if the worker has exited with an error."""
        code = self.process.returncode
        if code not in (None, 0):
            raise DemoError(f"the {self.direction} worker exited with code {code}; {self.tail()}")

    def tail(self) -> str:
        """The end of the worker's log, for error messages."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        except OSError:
            return f"its log {self.log} is unreadable"
        shown = "\n".join(f"    {line}" for line in lines) or "    (empty)"
        return f"last lines of {self.log}:\n{shown}"

    async def stop(self) -> None:
        """SIGTERM (the worker drains, commits, writes its stats), then SIGKILL if it hangs."""
        if not self.running:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), _STOP_GRACE)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    def stats(self) -> dict[str, Any] | None:
        """The worker's stats file, or None if it wrote none."""
        try:
            loaded = orjson.loads(self.stats_file.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return loaded if isinstance(loaded, dict) else None


@dataclass
class Produced:
    """What the demo's producer sent."""

    records: int = 0
    tombstones: int = 0
    null_keys: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CryptoStage:
    """Per-record seal and open times in this process, in microseconds."""

    records: int
    seal_us: Histogram
    open_us: Histogram
    mismatches: int
    kms_calls: Counter[str]


@dataclass
class Verification:
    """What reading the four topics back found."""

    expected: int
    source: int = 0
    encrypted: int = 0
    decrypted: int = 0
    dlq: int = 0
    missing: int = 0
    unexpected: int = 0
    plaintext_in_encrypted: int = 0
    not_envelopes: int = 0
    without_version_header: int = 0
    in_process_mismatches: int = 0
    dek_ids: set[bytes] = field(default_factory=set)
    headers_seen: set[bytes] = field(default_factory=set, repr=False)
    header_bytes: int = 0
    #: non-null values in the encrypted topic, their bytes, and the source values' bytes
    sealed: int = 0
    sealed_bytes: int = 0
    plain_bytes: int = 0

    @property
    def overhead(self) -> float | None:
        """Mean envelope bytes added per sealed record."""
        return (self.sealed_bytes - self.plain_bytes) / self.sealed if self.sealed else None

    @property
    def passed(self) -> bool:
        counts_agree = self.expected == self.source == self.encrypted == self.decrypted
        problems = (
            self.dlq,
            self.missing,
            self.unexpected,
            self.plaintext_in_encrypted,
            self.not_envelopes,
            self.without_version_header,
            self.in_process_mismatches,
        )
        return counts_agree and not any(problems)

    def describe(self) -> str:
        if self.passed:
            return (
                f"PASSED: all {self.decrypted:,} records identical (key, value, headers); "
                "no plaintext in the encrypted topic"
            )
        found = [
            f"{label} {value:,}"
            for label, value in (
                ("source", self.source),
                ("encrypted", self.encrypted),
                ("decrypted", self.decrypted),
                ("dead-lettered", self.dlq),
                ("missing", self.missing),
                ("unexpected", self.unexpected),
                ("plaintext in encrypted", self.plaintext_in_encrypted),
                ("not envelopes", self.not_envelopes),
                ("without envpipe.v header", self.without_version_header),
                ("in-process mismatches", self.in_process_mismatches),
            )
            if value
        ]
        return f"FAILED: expected {self.expected:,}; " + ", ".join(found)


@dataclass
class Report:
    """Everything the summary shows."""

    folder: Path
    topics: Topics
    produced: Produced
    encrypt_stats: dict[str, Any] | None
    decrypt_stats: dict[str, Any] | None
    crypto: CryptoStage
    verification: Verification
    kept: bool = True
    wall_seconds: float = 0.0


async def _demo(env: dev.DevEnv, folder: Path, count: int) -> Report:
    names = Topics()
    _say(f"creating topics {', '.join(names.all)} ({PARTITIONS} partitions each)")
    await topics.create_topics(env.bootstrap_servers, names.all, PARTITIONS)
    environ = _worker_environ(env)
    workers = [
        await Worker.start(
            "encrypt",
            ["--source", names.source, "--dest", names.encrypted, "--group", "demo-encrypt"],
            environ,
            folder,
        ),
        await Worker.start(
            "decrypt",
            [
                *("--source", names.encrypted, "--dest", names.decrypted),
                *("--group", "demo-decrypt", "--dlq", names.dlq),
            ],
            environ,
            folder,
        ),
    ]
    _say(
        "started the encrypt and decrypt workers (pids "
        + ", ".join(str(worker.process.pid) for worker in workers)
        + f"; logs in {folder})"
    )
    try:
        produced = await _pipeline(env, names, count, workers)
    finally:
        await asyncio.gather(*(worker.stop() for worker in workers))
    for worker in workers:
        worker.check()
    _say("reading all four topics back to verify")
    verification = await verify(env.bootstrap_servers, names, count)
    _say(f"in-process stage: {CRYPTO_STAGE_RECORDS:,} records through Encryptor / Decryptor")
    crypto = await crypto_stage(env, CRYPTO_STAGE_RECORDS)
    verification.in_process_mismatches = crypto.mismatches
    return Report(
        folder=folder,
        topics=names,
        produced=produced,
        encrypt_stats=workers[0].stats(),
        decrypt_stats=workers[1].stats(),
        crypto=crypto,
        verification=verification,
    )


def _worker_environ(env: dev.DevEnv) -> dict[str, str]:
    """This process's environment plus dev.env; the demo names each stats file itself."""
    environ = {**os.environ, **env.as_environ()}
    environ.pop(STATS_FILE_ENV, None)
    return environ


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

    def line(self) -> str:
        counts, names = self.watch.counts, self.watch.names
        return (
            f"{self.phase} | produced {self.produced.records:,}/{self.count:,} | "
            f"decrypted {counts[names.decrypted]:,} | dead-lettered {counts[names.dlq]:,}"
        )

    def show(self) -> None:
        text = self.line()
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


async def _pipeline(
    env: dev.DevEnv, names: Topics, count: int, workers: Sequence[Worker]
) -> Produced:
    """Produce while the workers run and wait until every record has come out the far end.

    Production starts once both workers hold their partitions, so the latency figures are
    the pipeline's and not the time two consumer groups take to form.
    """
    produced = Produced()
    async with topics.consumer(env.bootstrap_servers, client_id="envpipe-demo-watch") as kafka:
        watch = _Watch(kafka, names)
        status = _Status(count, produced, watch)
        background = [
            asyncio.create_task(watch.follow()),
            asyncio.create_task(status.keep_showing()),
        ]
        try:
            if not await _until(lambda: all(w.joined() for w in workers), _JOIN_SECONDS, workers):
                _say(f"no partition assignment logged within {_JOIN_SECONDS:g} s; producing anyway")
            status.phase = "producing"
            await _produce(env.bootstrap_servers, names.source, count, produced, workers)
            status.phase = "draining"
            drain_seconds = max(60.0, count / 1_000)
            if not await _until(lambda: watch.finished >= count, drain_seconds, workers):
                raise DemoError(
                    f"only {watch.finished:,} of {count:,} records came through within "
                    f"{drain_seconds:g} s; " + "; ".join(worker.tail() for worker in workers)
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
    workers: Sequence[Worker],
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


def _check(workers: Sequence[Worker]) -> None:
    """Raise DemoError if a worker has exited before the demo stopped it."""
    for worker in workers:
        worker.check()
        if not worker.running:
            raise DemoError(
                f"the {worker.direction} worker stopped before the run was complete; "
                + worker.tail()
            )


async def _until(condition: Callable[[], bool], seconds: float, workers: Sequence[Worker]) -> bool:
    """Poll `condition` until it holds (True) or `seconds` pass (False); workers must live."""
    deadline = time.monotonic() + seconds
    while not condition():
        _check(workers)
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


# --- verification ---------------------------------------------------------------------------


async def verify(bootstrap_servers: str, names: Topics, expected: int) -> Verification:
    """Read all four topics back: decrypted == source as multisets, no plaintext leaked."""
    result = Verification(expected=expected)
    source: Counter[Record] = Counter()
    plaintexts: set[bytes] = set()
    async for batch in _read(bootstrap_servers, names.source):
        for record in batch:
            source[_identity(record)] += 1
            if record.value is not None:
                plaintexts.add(record.value)
                result.plain_bytes += len(record.value)
    result.source = sum(source.values())
    async for batch in _read(bootstrap_servers, names.encrypted):
        _check_encrypted(batch, plaintexts, result)
    decrypted: Counter[Record] = Counter()
    async for batch in _read(bootstrap_servers, names.decrypted):
        decrypted.update(_identity(record) for record in batch)
    result.decrypted = sum(decrypted.values())
    async for batch in _read(bootstrap_servers, names.dlq):
        result.dlq += len(batch)
    result.missing = sum((source - decrypted).values())
    result.unexpected = sum((decrypted - source).values())
    return result


def _read(bootstrap_servers: str, topic: str) -> AsyncGenerator[list[Any], None]:
    """A whole topic, batch by batch, without a consumer group."""
    return topics.scan(bootstrap_servers, topic, client_id="envpipe-demo-verify")


def _identity(record: Any) -> Record:
    """What must survive the round trip byte for byte: key, value and headers in order."""
    return record.key, record.value, tuple(record.headers)


def _check_encrypted(batch: list[Any], plaintexts: set[bytes], result: Verification) -> None:
    """Every non-null value must be a v1 envelope and contain no plaintext."""
    for record in batch:
        result.encrypted += 1
        if VERSION_HEADER not in record.headers:
            result.without_version_header += 1
        value = record.value
        if value is None:
            continue
        if value in plaintexts or PLAINTEXT_MARKER in value:
            result.plaintext_in_encrypted += 1
        result.sealed += 1
        result.sealed_bytes += len(value)
        if any(value.startswith(seen) for seen in result.headers_seen):
            continue
        try:
            header, length = decode_header(value)
        except DecryptionError:
            result.not_envelopes += 1
            continue
        result.headers_seen.add(value[:length])
        result.header_bytes = length
        result.dek_ids.add(header.dek_id)


# --- the in-process stage ---------------------------------------------------------------------


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for a moment: AwsKms takes credentials only from there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def crypto_stage(env: dev.DevEnv, count: int) -> CryptoStage:
    """Seal, then open, `count` sample records one by one, timing each call.

    The settings are the workers' (this environment plus dev.env), so the same DEK limits
    apply; the KMS is the same moto server.
    """
    environ = _worker_environ(env)
    settings = load_settings({}, environ=environ)
    seal_us, open_us = Histogram(), Histogram()
    mismatches = 0
    async with contextlib.AsyncExitStack() as stack:
        with _environ(environ):
            kms = CountingKms(await AwsKms.open(endpoint_url=env.kms_endpoint, region=env.region))
        stack.push_async_callback(kms.close)
        encryptor = Encryptor.from_settings(kms, settings, stream="demo.in-process")
        stack.push_async_callback(encryptor.close)
        decryptor = await Decryptor.from_settings(kms, settings)
        stack.callback(decryptor.close)
        samples = [(value, key) for key, value, _ in sample_records(count) if value is not None]
        sealed = []
        for value, key in samples:
            started = time.perf_counter_ns()
            sealed.append(await encryptor.seal(value, key))
            seal_us.add((time.perf_counter_ns() - started) / 1_000)
        for (value, key), envelope in zip(samples, sealed, strict=True):
            started = time.perf_counter_ns()
            opened = await decryptor.open(envelope, key)
            open_us.add((time.perf_counter_ns() - started) / 1_000)
            mismatches += opened != value
    return CryptoStage(len(samples), seal_us, open_us, mismatches, kms.calls)


# --- the summary ----------------------------------------------------------------------------

_SOURCES = {
    "producer": "the demo's producer: records sent to the source topic and acknowledged "
    "(acks=all). Production starts once both workers hold their partitions and runs while "
    "they work.",
    "encrypt stats": "the encrypt worker's stats file, written as it exits. Throughput = "
    "records read / active seconds (first fetch to last acknowledgement); while records are "
    "still being produced it cannot exceed the producer's rate. Latency = wall clock when "
    "the output batch was acknowledged minus the record's timestamp, set by the producer.",
    "decrypt stats": "the decrypt worker's stats file, same definitions. The record "
    "timestamp passes through the encrypt worker unchanged, so this latency is end to end: "
    "source produce to decrypted write.",
    "in-process": "timed in this process, one call at a time: Encryptor.seal, then "
    "Decryptor.open, against the same moto KMS (AwsKms wrapped in CountingKms). The first "
    "call of each includes the KMS round trips for the DEK.",
    "read-back": "after the workers exited, the demo read all four topics from the start: "
    "decrypted vs source as multisets of (key, value, headers); every encrypted value a v1 "
    "envelope with no plaintext in it; overhead = mean encrypted minus plaintext size.",
}
_WRAP = 100


def render(report: Report) -> str:
    """The summary table (figure, source, value), then what each source means."""
    produced, check, crypto = report.produced, report.verification, report.crypto
    enc, dec = report.encrypt_stats or {}, report.decrypt_stats or {}
    overhead = check.overhead
    rows = [
        (
            "records",
            "producer",
            f"{produced.records:,} ({produced.null_keys:,} null keys, "
            f"{produced.tombstones:,} tombstones)",
        ),
        ("producer rate", "producer", f"{produced.rate:,.0f} records/s"),
        ("encrypt worker throughput", "encrypt stats", _rate(enc)),
        ("decrypt worker throughput", "decrypt stats", _rate(dec)),
        ("latency produce→encrypted", "encrypt stats", _latency(enc)),
        ("latency produce→decrypted", "decrypt stats", _latency(dec)),
        ("seal, per record", "in-process", _micros(crypto.seal_us, crypto.records)),
        ("open, per record", "in-process", _micros(crypto.open_us, crypto.records)),
        ("KMS calls, encrypt worker", "encrypt stats", _calls(enc.get("kms_calls"))),
        ("KMS calls, decrypt worker", "decrypt stats", _calls(dec.get("kms_calls"))),
        ("KMS calls, in-process", "in-process", _calls(crypto.kms_calls)),
        ("DEK cache hit ratio, encrypt", "encrypt stats", _hit_ratio(enc.get("cache"))),
        ("DEK cache hit ratio, decrypt", "decrypt stats", _hit_ratio(dec.get("cache"))),
        (
            "envelope overhead",
            "read-back",
            "n/a"
            if overhead is None
            else f"{overhead:,.1f} B/record (header {check.header_bytes} B + nonce 12 B "
            "+ length 2 B + GCM tag 16 B)",
        ),
        ("DEKs used", "read-back", f"{len(check.dek_ids):,} (distinct dek_id in the topic)"),
        (
            "dead-lettered",
            "decrypt stats",
            f"{dec.get('dlq', 'n/a')} (read-back: the DLQ topic holds {check.dlq:,})",
        ),
        ("verification", "read-back", check.describe()),
    ]
    width = max(len(figure) for figure, _, _ in rows)
    source_width = max(len(name) for name in _SOURCES)
    lines = [
        "",
        f"envpipe demo: {produced.records:,} records through encrypt and decrypt workers, "
        f"{PARTITIONS} partitions, embedded Tansu broker + moto KMS",
        f"topics: {' -> '.join(report.topics.all[:3])}, dead letters to {report.topics.dlq}",
        f"{os.cpu_count()} CPUs shared by the broker, the KMS emulator, both workers and the "
        "demo's producer",
        "",
        f"  {'figure':<{width}}  {'source':<{source_width}}  value",
        f"  {'-' * width}  {'-' * source_width}  {'-' * 40}",
    ]
    lines += [f"  {fig:<{width}}  {src:<{source_width}}  {value}" for fig, src, value in rows]
    lines += ["", "sources:"]
    for name, text in _SOURCES.items():
        lines += textwrap.wrap(
            text,
            _WRAP,
            initial_indent=f"  {name:<{source_width}}  ",
            subsequent_indent=" " * (source_width + 4),
        )
    lines += [
        "",
        f"stats files and worker logs: {report.folder}"
        + (
            ""
            if report.kept
            else " (a temporary folder, removed at exit; keep it with --state-dir)"
        ),
        f"wall time: {report.wall_seconds:.1f} s (start services, run, verify, in-process stage)",
        "",
    ]
    return "\n".join(lines)


def _rate(stats: Mapping[str, Any]) -> str:
    if not stats:
        return "n/a (no stats file)"
    return (
        f"{stats['records_per_s']:,.0f} records/s ({stats['records_in']:,} records in "
        f"{stats['active_seconds']:.2f} s)"
    )


def _latency(stats: Mapping[str, Any]) -> str:
    latency = stats.get("latency_ms")
    if not latency:
        return "n/a"
    return "  ".join(f"{name} {_ms(latency.get(name))}" for name in ("p50", "p99", "p999"))


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} ms" if value < 10 else f"{value:,.0f} ms"


def _micros(histogram: Histogram, records: int) -> str:
    if not histogram.count:
        return "n/a"
    return (
        f"p50 {histogram.percentile(50):,.1f} µs  p99 {histogram.percentile(99):,.1f} µs  "
        f"({records:,} records)"
    )


def _calls(calls: Mapping[str, int] | None) -> str:
    if calls is None:
        return "n/a"
    return ", ".join(f"{op} {n}" for op, n in sorted(calls.items())) or "none"


def _hit_ratio(cache: Mapping[str, int] | None) -> str:
    if not cache:
        return "n/a"
    hits, misses = cache.get("hit", 0), cache.get("miss", 0)
    if not hits + misses:
        return "n/a (no lookups)"
    return f"{hits / (hits + misses):.4%} (hit {hits:,}, miss {misses:,})"
