"""The Faust app (`faust -A workers.faust_app worker`) on the embedded broker and moto.

The Faust worker runs as a subprocess configured only through the environment, as the docs
say to run it. Its envelopes are checked the strongest way there is: the aiokafka
`envpipe decrypt` worker must open what Faust sealed, and Faust must open what
`envpipe encrypt` sealed, both byte-identical with keys, headers and timestamps. Kafka helpers
and the worker launcher come from the stream workers' tests, so both suites compare records
the same way.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pipeline.envelope import STREAM_CONTEXT_KEY, VERSION_HEADER, decode_header
from pipeline.errors import ConfigError
from tests import kit
from tests.kit import IDLE, MARKER, REPO, Proc, Rec, Workers
from workers.dev import DevEnv
from workers.supervisor import Child

if TYPE_CHECKING:
    from workers.faust_app import FaustTopics

pytestmark = [
    pytest.mark.broker,  # the same tests against Tansu and Apache Kafka
    pytest.mark.timeout(120),
    pytest.mark.skipif(find_spec("faust") is None, reason="the faust extra is not installed"),
]

RECORDS = 1_000


@dataclass
class FaustWorker:
    """A `faust ... worker` subprocess and the topics it was started with."""

    topics: FaustTopics
    proc: Proc

    async def stop(self) -> int:
        """SIGTERM, as an orchestrator stops it; returns the exit code."""
        if self.proc.returncode is None:
            self.proc.signal(signal.SIGTERM)
        return await self.proc.wait(30)


class Launcher:
    """Starts Faust workers, and (`pool`) envpipe workers; kills any left at teardown."""

    def __init__(self, pool: Workers, tmp_path: Path) -> None:
        self.pool = pool
        self._tmp = tmp_path
        self._started: list[FaustWorker] = []

    async def start(self, topics: FaustTopics, stats_file: Path | None = None) -> FaustWorker:
        idle = topics.stop_when_idle
        variables = {
            "ENVPIPE_FAUST_STOP_WHEN_IDLE": "" if idle is None else f"{idle:g}",
            "ENVPIPE_STATS_FILE": "" if stats_file is None else str(stats_file),
            "ENVPIPE_FAUST_APP_ID": topics.app_id,
            "ENVPIPE_FAUST_ENCRYPTED": topics.encrypted,
            "ENVPIPE_FAUST_SOURCE": topics.source,
            "ENVPIPE_FAUST_CLEAR": topics.clear,
            "ENVPIPE_FAUST_DLQ": topics.dlq,
            "FAUST_DATADIR": str(self._tmp / f"{topics.app_id}-data"),
        }
        log = self._tmp / f"{topics.app_id}.log"
        child = Child.spawn(
            [sys.executable, "-m", "faust", "-A", "workers.faust_app", "worker", "-l", "info"],
            name=f"the Faust worker {topics.app_id}",
            log=log,
            env=self.pool.environ(**variables),
            cwd=REPO,
        )
        worker = FaustWorker(topics, Proc(topics.app_id, child, log, log))
        self._started.append(worker)
        return worker

    async def close(self) -> None:
        for worker in self._started:
            if worker.proc.returncode is None:
                worker.proc.kill()
                await worker.proc.child.wait(10)
        await self.pool.close()


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faust")


@pytest.fixture(scope="module")
async def launch(dev_env: DevEnv, tmp_module: Path) -> AsyncIterator[Launcher]:
    launcher = Launcher(Workers(dev_env, tmp_module), tmp_module)
    try:
        yield launcher
    finally:
        await launcher.close()


@dataclass
class Trip:
    """A Faust worker with both agents, and the records it was given."""

    faust: FaustWorker
    source: list[Any]


@pytest.fixture(scope="module")
async def trip(dev_env: DevEnv, launch: Launcher) -> Trip:
    """Plaintext in, through Faust's encrypt and decrypt agents, all out again."""
    from workers.faust_app import FaustTopics

    bootstrap = dev_env.bootstrap_servers
    topics = FaustTopics(
        source=kit.name("faust-plain"),
        encrypted=kit.name("faust-enc"),
        clear=kit.name("faust-clear"),
        dlq=kit.name("faust-dlq"),
        app_id=kit.name("faust-app"),
    )
    for topic in (topics.source, topics.encrypted, topics.clear, topics.dlq):
        await kit.create_topic(bootstrap, topic)
    plain = topics.source
    faust = await launch.start(topics)
    await kit.produce(bootstrap, plain, kit.mixed_records(RECORDS))
    source = await kit.read(bootstrap, plain)
    assert len(source) == RECORDS
    await _until(faust, _wait_records(bootstrap, topics.clear, RECORDS, within=60))
    return Trip(faust, source)


async def _wait_records(bootstrap: str, topic: str, at_least: int, within: float) -> None:
    """Poll by fetching: Tansu's ListOffsets undercounts topics written in multi-record batches."""
    deadline = asyncio.get_running_loop().time() + within
    while (count := len(await kit.read(bootstrap, topic))) < at_least:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{topic} holds {count} records after {within}s, expected {at_least}")
        await asyncio.sleep(0.5)


async def _until(faust: FaustWorker, waiting: Any) -> None:
    """Await `waiting`, or fail at once with the worker's log if the worker exits."""
    task = asyncio.ensure_future(waiting)
    exited = asyncio.ensure_future(faust.proc.wait(600))
    try:
        await asyncio.wait({task, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            pytest.fail(f"the Faust worker exited with {exited.result()}:\n{faust.proc.tail()}")
        await task
    finally:
        for future in (task, exited):
            future.cancel()


async def test_faust_round_trip_returns_every_record(dev_env: DevEnv, trip: Trip) -> None:
    bootstrap, topics = dev_env.bootstrap_servers, trip.faust.topics
    sealed = await kit.read(bootstrap, topics.encrypted)
    opened = await kit.read(bootstrap, topics.clear)

    assert len(sealed) == len(trip.source)
    assert not [r for r in sealed if r.value is not None and MARKER in r.value]
    assert all(r.headers[-1] == VERSION_HEADER for r in sealed)
    assert sum(r.value is None for r in sealed) == sum(r.value is None for r in trip.source)
    header, _ = decode_header(next(r.value for r in sealed if r.value))
    assert header.kms_key_id == dev_env.kms_key_canonical
    assert header.signing_key_id == dev_env.signing_key_canonical
    assert dict(header.encryption_context) == {STREAM_CONTEXT_KEY: topics.source}
    # Key, value, headers (repeats and order kept) and timestamp, as a multiset.
    assert Counter(map(Rec.of, opened)) == Counter(map(Rec.of, trip.source))
    assert await kit.read(bootstrap, topics.dlq) == []
    where = {r.key: r.partition for r in trip.source if r.key is not None}
    assert all(where[r.key] == r.partition for r in (*sealed, *opened) if r.key is not None)


async def test_envpipe_decrypt_opens_what_faust_sealed(
    dev_env: DevEnv, trip: Trip, launch: Launcher
) -> None:
    bootstrap, enc = dev_env.bootstrap_servers, trip.faust.topics.encrypted
    dec, dlq = kit.name("faust-dec"), kit.name("faust-dec-dlq")
    decrypt = await launch.pool.decrypt(
        enc, dec, dlq, kit.name("g"), "--stop-when-idle", IDLE, name="dec"
    )
    assert await decrypt.wait(60) == 0, decrypt.tail()

    assert Counter(map(Rec.of, await kit.read(bootstrap, dec))) == Counter(map(Rec.of, trip.source))
    assert decrypt.stats()["dlq"] == 0


async def test_faust_opens_what_envpipe_encrypt_sealed_and_dead_letters_tampering(
    dev_env: DevEnv, launch: Launcher
) -> None:
    from workers.faust_app import FaustTopics

    bootstrap = dev_env.bootstrap_servers
    plain, enc = kit.name("faust-in"), kit.name("faust-in-enc")
    for topic in (plain, enc):
        await kit.create_topic(bootstrap, topic)
    topics = FaustTopics(
        encrypted=enc,
        clear=kit.name("faust-in-clear"),
        dlq=kit.name("faust-in-dlq"),
        app_id=kit.name("f"),
    )
    faust = await launch.start(topics)  # decrypt agent only; it makes its output topics
    originals = kit.mixed_records(300)
    await kit.produce(bootstrap, plain, originals)
    encrypt = await launch.pool.encrypt(
        plain, enc, kit.name("g"), "--stop-when-idle", IDLE, name="enc"
    )
    assert await encrypt.wait(60) == 0, encrypt.tail()
    sample = next(r for r in await kit.read(bootstrap, enc) if r.value and r.key)
    value, headers = sample.value, (*sample.headers, ("n", b"bad"))
    bad = [  # (expected reason, record)
        ("bad_tag", Rec(b"bad-ciphertext", kit.flip(value, len(value) - 1), headers)),
        ("bad_tag", Rec(b"bad-other-key", value, headers)),  # the AAD binds the record key
        ("malformed", Rec(b"bad-plaintext", b'{"card": "4111 1111 1111 1111"}', (("n", b"p"),))),
    ]
    metadata = await kit.produce(bootstrap, enc, [rec for _, rec in bad])

    good = len(originals)
    await _until(faust, _wait_records(bootstrap, topics.clear, good, within=60))
    await _until(faust, _wait_records(bootstrap, topics.dlq, len(bad), within=30))
    assert await faust.stop() == 0, faust.proc.tail()

    source = await kit.read(bootstrap, plain)
    opened = await kit.read(bootstrap, topics.clear)
    assert Counter(map(Rec.of, opened)) == Counter(map(Rec.of, source))
    # The app made its missing output topics like its input: three partitions, keys kept.
    where = {r.key: r.partition for r in await kit.read(bootstrap, enc) if r.key is not None}
    assert all(where[r.key] == r.partition for r in opened if r.key is not None)
    assert {r.partition for r in opened} == {0, 1, 2}
    kit.assert_dead_letters(await kit.read(bootstrap, topics.dlq), bad, metadata, enc)


async def test_sigterm_exits_zero_with_everything_committed(dev_env: DevEnv, trip: Trip) -> None:
    topics = trip.faust.topics
    assert await trip.faust.stop() == 0, trip.faust.proc.tail()

    expected = Counter(r.partition for r in trip.source)
    committed = await kit.committed(dev_env.bootstrap_servers, topics.app_id, topics.source)
    assert committed == [expected[p] for p in range(3)]
    sealed = Counter(
        r.partition for r in await kit.read(dev_env.bootstrap_servers, topics.encrypted)
    )
    committed = await kit.committed(dev_env.bootstrap_servers, topics.app_id, topics.encrypted)
    assert committed == [sealed[p] for p in range(3)]
    # One worker, one KMS client and cache for both agents: one DEK for every record.
    calls = re.search(r"KMS calls by operation: (.*)", trip.faust.proc.tail())
    assert calls is not None, trip.faust.proc.tail()
    assert {"generate_data_key 1", "sign 1", "unwrap 1"} <= set(calls.group(1).strip().split(", "))


async def test_idle_stop_exits_zero_and_writes_the_stats_file(
    dev_env: DevEnv, launch: Launcher, tmp_module: Path
) -> None:
    from workers.faust_app import FaustTopics

    bootstrap = dev_env.bootstrap_servers
    topics = FaustTopics(
        source=kit.name("faust-idle-plain"),
        encrypted=kit.name("faust-idle-enc"),
        app_id=kit.name("faust-idle"),
        stop_when_idle=1.0,
    )
    for topic in (topics.source, topics.encrypted):
        await kit.create_topic(bootstrap, topic)
    records = kit.mixed_records(200)
    await kit.produce(bootstrap, topics.source, records)
    stats_file = tmp_module / f"{topics.app_id}.json"
    faust = await launch.start(topics, stats_file=stats_file)

    assert await faust.proc.wait(90) == 0, faust.proc.tail()
    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    assert stats["direction"] == "encrypt"
    assert stats["records_in"] == stats["records_out"] == len(records)
    assert stats["dlq"] == 0
    assert stats["tombstones"] == sum(r.value is None for r in records)
    assert all(stats["latency_ms"][p] is not None for p in ("p50", "p99", "p999"))
    assert {"generate_data_key": 1, "sign": 1}.items() <= stats["kms_calls"].items()
    assert stats["cache"]
    assert stats["envelope_overhead_bytes"] > 0
    assert len(stats["assigned_partitions"]) == 3
    committed = await kit.committed(bootstrap, topics.app_id, topics.source)
    assert sum(committed) == len(records)


# --- pieces -----------------------------------------------------------------------------------


def test_timestamps_survive_faust_seconds_to_the_millisecond() -> None:
    from workers.faust_delivery import _exact_seconds

    edge = [*range(0, 200_000, 7), 1_700_000_000_123, 253_402_300_799_999]
    assert [int((_exact_seconds(ms / 1000.0) or 0) * 1000) for ms in edge] == edge
    assert _exact_seconds(None) is None


@pytest.mark.parametrize(
    ("environ", "setting"),
    [
        *(
            (
                {
                    "ENVPIPE_FAUST_ENCRYPTED": "b",
                    "ENVPIPE_FAUST_SOURCE": "a",
                    "ENVPIPE_FAUST_STOP_WHEN_IDLE": bad,
                },
                "ENVPIPE_FAUST_STOP_WHEN_IDLE",
            )
            for bad in ("soon", "0", "-1", "nan", "inf")
        ),
        ({"ENVPIPE_FAUST_SOURCE": "a"}, "ENVPIPE_FAUST_ENCRYPTED"),
        ({"ENVPIPE_FAUST_ENCRYPTED": "b"}, "ENVPIPE_FAUST_SOURCE"),
        ({"ENVPIPE_FAUST_ENCRYPTED": "b", "ENVPIPE_FAUST_CLEAR": "c"}, "ENVPIPE_FAUST_DLQ"),
    ],
)
def test_missing_topics_name_the_variable(environ: dict[str, str], setting: str) -> None:
    from workers.faust_app import FaustTopics

    with pytest.raises(ConfigError) as caught:
        FaustTopics.from_environ(environ)
    assert caught.value.setting == setting


def test_topics_from_environ() -> None:
    from workers.faust_app import FaustTopics

    topics = FaustTopics.from_environ(
        {"ENVPIPE_FAUST_ENCRYPTED": "e", "ENVPIPE_FAUST_SOURCE": " s ", "ENVPIPE_FAUST_STREAM": "x"}
    )
    assert topics == FaustTopics(encrypted="e", source="s", stream="x", app_id="envpipe-faust")
    idle = {"ENVPIPE_FAUST_ENCRYPTED": "e", "ENVPIPE_FAUST_SOURCE": "s"}
    idle["ENVPIPE_FAUST_STOP_WHEN_IDLE"] = "2.5"
    assert FaustTopics.from_environ(idle).stop_when_idle == 2.5
