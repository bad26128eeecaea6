"""The stream workers end to end: real embedded broker, real KMS emulator, real processes.

Workers run as subprocesses (`python -m workers.cli ...`) configured only through the
environment, as an operator would run them; their stats files (ENVPIPE_STATS_FILE) and logs
land in the test's tmp_path. Every test uses its own topics and consumer groups. Records
carry unique keys, so "nothing lost" is a set comparison and duplicates can be counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.rigs.kms_proxy import KmsFaultProxy
from pipeline.envelope import VERSION_HEADER, decode_header
from pipeline.errors import KeyUnavailableError, KmsUnavailableError, SealError
from pipeline.types import EncryptionContext
from tests import kit
from tests.kit import IDLE, MARKER, Rec, Tail, Workers
from tests.outages import KmsOutage
from workers.contract import ERROR_HEADER, SOURCE_HEADER
from workers.dev import DevEnv
from workers.stats import Histogram

pytestmark = pytest.mark.broker  # the same tests against Tansu and Apache Kafka

# --- the histogram ---------------------------------------------------------------------------


def test_histogram_percentiles_are_within_one_percent() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(3, 2) for _ in range(50_000)] + [0.0, -5.0]
    histogram = Histogram()
    histogram.add_many(values)
    ordered = sorted(values)
    for p in (1, 10, 50, 90, 99, 99.9, 100):
        exact = ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]
        assert histogram.percentile(p) == pytest.approx(exact, rel=0.0101), p
    assert histogram.count == len(values)
    assert -5.0 <= histogram.percentile(0) <= 0.01  # at or below the smallest bucket
    assert Histogram().summary() == {"p50": None, "p99": None, "p999": None}


# --- the fault proxy itself ------------------------------------------------------------------


async def test_fault_proxy_modes_reach_the_client_as_retriable_errors(dev_env: DevEnv) -> None:
    async with (
        KmsFaultProxy(dev_env.kms_endpoint) as proxy,
        kit.moto(dev_env, proxy.endpoint, attempts=1) as (kms, _),
    ):
        arn = await kms.resolve_wrapping_key(dev_env.kms_key_id)
        assert arn == dev_env.kms_key_canonical
        context = EncryptionContext.of({"envpipe:stream": "s"})
        for mode, code in [("throttle", "ThrottlingException"), ("internal", "KMSInternal")]:
            await proxy.set_mode(mode)  # type: ignore[arg-type]
            with pytest.raises(KmsUnavailableError, match=code):
                await kms.generate_data_key(arn, context)
        # AWS's answers for a key that is switched off: not retriable, `key_unavailable`
        proxy.only = {"Decrypt"}
        for mode, code in [
            ("disabled", "DisabledException"),
            ("invalid_state", "KMSInvalidStateException"),
            ("not_found", "NotFoundException"),
        ]:
            await proxy.set_mode(mode)  # type: ignore[arg-type]
            key = await kms.generate_data_key(arn, context)  # not Decrypt: passes
            with pytest.raises(KeyUnavailableError, match=code) as caught:
                await kms.unwrap(arn, key.wrapped, context)
            assert not caught.value.retriable
        proxy.only = None
        await proxy.set_mode("refuse")
        with pytest.raises(KmsUnavailableError, match="ConnectionError"):
            await kms.sign(dev_env.signing_key_canonical, b"m", hashlib.sha256(b"m").digest())
        await proxy.set_mode("stall")
        call = asyncio.ensure_future(kms.generate_data_key(arn, context))
        await asyncio.sleep(0.5)
        assert not call.done()
        await proxy.set_mode("pass")
        assert (await asyncio.wait_for(call, 5)).key_id == arn
    assert proxy.count("stall", "GenerateDataKey") == 1
    assert proxy.count("throttle") == proxy.count("internal") == 1
    assert proxy.count("disabled", "Decrypt") == proxy.count("not_found", "Decrypt") == 1


# --- 1. the round trip -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_encrypt_then_decrypt_returns_every_record(
    provider_env: DevEnv, provider_workers: Workers
) -> None:
    """The round trip, for each cryptography service."""
    env, workers = provider_env, provider_workers
    bootstrap = env.bootstrap_servers
    plain, enc, dec, dlq = (kit.name(f"rt-{part}") for part in ("plain", "enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, plain)
    originals = kit.mixed_records(10_000)
    await kit.produce(bootstrap, plain, originals)
    source = await kit.read(bootstrap, plain)
    assert len(source) == len(originals)

    encrypt = await workers.encrypt(plain, enc, kit.name("g"), "--stop-when-idle", IDLE, name="enc")
    assert await encrypt.wait(90) == 0, encrypt.tail()
    sealed = await kit.read(bootstrap, enc)
    decrypt = await workers.decrypt(
        enc,
        dec,
        dlq,
        kit.name("g"),
        "--stop-when-idle",
        IDLE,
        name="dec",
        ENVPIPE_MAX_INFLIGHT_RECORDS="1000",  # backpressure: pause and resume, many times
    )
    assert await decrypt.wait(90) == 0, decrypt.tail()
    opened = await kit.read(bootstrap, dec)

    # Nothing readable on the encrypted topic; tombstones stay tombstones.
    assert len(sealed) == len(source)
    assert not [r for r in sealed if r.value is not None and MARKER in r.value]
    assert all(r.headers[-1] == VERSION_HEADER for r in sealed)
    tombstones = sum(r.value is None for r in source)
    assert sum(r.value is None for r in sealed) == tombstones
    # The round trip: key, value, headers and timestamp, as a multiset.
    assert Counter(map(Rec.of, opened)) == Counter(map(Rec.of, source))
    assert await kit.count(bootstrap, dlq) == 0
    # The default partitioner keeps a key's partition, topic to topic.
    where = {r.key: r.partition for r in source if r.key is not None}
    assert all(where[r.key] == r.partition for r in (*sealed, *opened) if r.key is not None)
    # The headers name the provider's canonical keys.
    header, _ = decode_header(next(r.value for r in sealed if r.value))
    assert header.kms_key_id == env.kms_key_canonical
    assert header.signing_key_id.startswith(env.signing_key_canonical)

    for stats, direction in ((encrypt.stats(), "encrypt"), (decrypt.stats(), "decrypt")):
        assert stats["direction"] == direction
        assert stats["records_in"] == stats["records_out"] == len(source)
        assert stats["tombstones"] == tombstones
        assert stats["dlq"] == 0
        assert stats["active_seconds"] > 0
        assert stats["records_per_s"] > 0
        assert 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]
        assert stats["envelope_overhead_bytes"] > 300
        assert stats["cache"]["hit"] > 0
    assert encrypt.stats()["kms_calls"]["generate_data_key"] >= 1
    assert decrypt.stats()["kms_calls"]["unwrap"] >= 1
    assert decrypt.stats()["pauses"]["backpressure"] > 1


# --- 2. kill -9 and restart ------------------------------------------------------------------


@dataclass
class Interrupted:
    """An encrypt worker stopped by a signal mid-stream."""

    plain: str
    enc: str
    group: str
    originals: list[Rec]
    written: int  # records on the encrypted topic when the signal was sent
    exit_code: int


async def _interrupt_encrypt(bootstrap: str, workers: Workers, sig: signal.Signals) -> Interrupted:
    """Encrypt 40,000 records and send `sig` once 3,000 are written (small batches: slow)."""
    plain, enc, group = kit.name(f"{sig.name}-plain"), kit.name(f"{sig.name}-enc"), kit.name("g")
    await kit.create_topic(bootstrap, plain)
    originals = kit.keyed(40_000, 300)
    await kit.produce(bootstrap, plain, originals)
    first = await workers.encrypt(plain, enc, group, "--batch-max-records", "100", name="first")
    async with Tail(bootstrap, enc) as tail:
        written = await tail.wait_for(3_000, within=60)
        first.signal(sig)
    exit_code = await first.wait(45)
    assert written < len(originals), f"the worker finished before {sig.name}"
    return Interrupted(plain, enc, group, originals, written, exit_code)


async def _restart(bootstrap: str, workers: Workers, run: Interrupted) -> list[Any]:
    """Run the group again to the end; returns the encrypted topic, checked for losses."""
    second = await workers.encrypt(
        run.plain, run.enc, run.group, "--stop-when-idle", IDLE, name="second"
    )
    assert await second.wait(90) == 0, second.tail()
    sealed = await kit.read(bootstrap, run.enc)
    assert {r.key for r in sealed} == {r.key for r in run.originals}, "records were lost"
    assert not [r for r in sealed if MARKER in r.value]
    assert sum(await kit.committed(bootstrap, run.group, run.plain)) == len(run.originals)
    return sealed


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_kill_9_then_restart_loses_nothing(
    provider_env: DevEnv, provider_workers: Workers
) -> None:
    bootstrap, workers = provider_env.bootstrap_servers, provider_workers
    run = await _interrupt_encrypt(bootstrap, workers, signal.SIGKILL)
    assert run.exit_code == -signal.SIGKILL
    sealed = await _restart(bootstrap, workers, run)
    print(f"kill -9 after {run.written} records: {kit.duplicates(sealed)} duplicates, 0 lost")


# --- 3. KMS outage ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_encrypt_rides_out_a_kms_outage(
    provider_env: DevEnv, provider_workers: Workers, tmp_path: Path
) -> None:
    env, workers = provider_env, provider_workers
    bootstrap = env.bootstrap_servers
    plain, enc, group = kit.name("outage-plain"), kit.name("outage-enc"), kit.name("g")
    await kit.create_topic(bootstrap, plain)
    originals = kit.keyed(9_000, 200)
    before, during = originals[:3_000], originals[3_000:]
    await kit.produce(bootstrap, plain, before)

    async with KmsOutage(env, tmp_path) as outage:
        worker = await workers.encrypt(
            plain,
            enc,
            group,
            "--stop-when-idle",
            "4",
            name="outage",
            **outage.variables,
            ENVPIPE_DEK_MAX_RECORDS="2000",
            ENVPIPE_DEK_GRACE_SECONDS="1",
            ENVPIPE_KMS_RETRY_MAX_SECONDS="1",
        )
        async with Tail(bootstrap, enc) as tail:
            await tail.wait_for(len(before), within=60)
            await outage.begin("refuse")
            await kit.produce(bootstrap, plain, during)
            stalled = await tail.settled()
            # The spent DEK stopped the worker; grace never stretches a DEK's record limit.
            assert len(before) <= stalled < len(originals)
            for mode, seconds in outage.modes(("throttle", 3), ("internal", 3), ("stall", 5)):
                await outage.begin(mode)
                met = outage.failed_calls(worker, mode)
                assert await tail.poll(seconds) == stalled
                assert outage.failed_calls(worker, mode) > met, f"no KMS call met {mode}"
        assert worker.returncode is None

        await outage.end()
        assert await worker.wait(90) == 0, worker.tail()

    sealed = await kit.read(bootstrap, enc)
    assert {r.key for r in sealed} == {r.key for r in originals}
    plaintext = {r.key: r.value for r in originals}
    async with kit.service(env) as kms:
        decryptor = await kit.opener(kms, env)
        opened = await decryptor.open_many([(r.value, r.key) for r in sealed])
    assert all(value == plaintext[r.key] for r, value in zip(sealed, opened, strict=True))
    assert worker.stats()["pauses"]["kms"] >= 1
    log = worker.log.read_text()
    assert "retry" in log
    for secret in (env.secret_access_key, env.variables.get("VAULT_TOKEN"), outage.secret):
        assert not secret or secret not in log
    print(f"outage: stalled at {stalled}, {kit.duplicates(sealed)} duplicates")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_decrypt_holds_good_records_through_a_kms_outage(
    provider_env: DevEnv, provider_workers: Workers, tmp_path: Path
) -> None:
    env, workers = provider_env, provider_workers
    bootstrap = env.bootstrap_servers
    enc, dec, dlq, group = (kit.name(f"dout-{part}") for part in ("enc", "dec", "dlq", "g"))
    await kit.create_topic(bootstrap, enc)
    originals = kit.keyed(2_000, 200)
    async with kit.service(env) as kms:
        # Two encryptors, two DEKs: the second one is first seen during the outage.
        first, second = await kit.sealer(kms, env, enc), await kit.sealer(kms, env, enc)
        pairs = [(r.value or b"", r.key) for r in originals]
        sealed_a = _sealed(await first.seal_many(pairs[:1_000]))
        sealed_b = _sealed(await second.seal_many(pairs[1_000:]))
        await first.close()
        await second.close()
    envelopes = [
        Rec(r.key, value, (VERSION_HEADER,))
        for r, value in zip(originals, [*sealed_a, *sealed_b], strict=True)
    ]
    await kit.produce(bootstrap, enc, envelopes[:1_000])

    async with KmsOutage(env, tmp_path) as outage:
        worker = await workers.decrypt(
            enc,
            dec,
            dlq,
            group,
            "--stop-when-idle",
            "4",
            name="decrypt-outage",
            ENVPIPE_KMS_RETRY_MAX_SECONDS="1",
            **outage.variables,
        )
        async with Tail(bootstrap, dec) as tail:
            await tail.wait_for(1_000, within=60)
            await outage.begin("internal")
            await kit.produce(bootstrap, enc, envelopes[1_000:])
            assert await tail.poll(3) == 1_000
        assert outage.failed_calls(worker, "internal", "unwrap") > 0
        assert worker.returncode is None
        await outage.end()
        assert await worker.wait(90) == 0, worker.tail()

    assert await kit.count(bootstrap, dlq) == 0
    opened = await kit.read(bootstrap, dec)
    assert Counter((r.key, r.value) for r in opened) == Counter((r.key, r.value) for r in originals)


def _sealed(results: list[bytes | SealError]) -> list[bytes]:
    """Envelopes of a batch that must have sealed entirely."""
    assert all(isinstance(result, bytes) for result in results)
    return [result for result in results if isinstance(result, bytes)]


# --- 4. hostile input goes to the DLQ --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_tampering_is_dead_lettered_with_no_unwrap(
    provider_env: DevEnv, provider_workers: Workers
) -> None:
    """Forged headers cost no unwrap at the service, whichever service it is."""
    env, workers = provider_env, provider_workers
    bootstrap = env.bootstrap_servers
    enc, dec, dlq = (kit.name(f"tamper-{part}") for part in ("enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, enc)
    good = kit.keyed(200, 150, prefix="good")
    async with kit.service(env) as kms:
        sealer = await kit.sealer(kms, env, enc)
        sealed = _sealed(await sealer.seal_many([(r.value or b"", r.key) for r in good]))
        await sealer.close()
    value = sealed[0]
    header, _ = decode_header(value)
    bad = [
        (
            "bad_signature",
            Rec(
                b"bad-signature",
                await kit.forge(value, signature=b"\x30\x06" + header.signature[2:]),
            ),
        ),
        (
            "bad_signature",
            Rec(b"bad-wrapped", await kit.forge(value, wrapped_dek=header.wrapped_dek[:-1] + b"x")),
        ),
        (
            "bad_signature",
            Rec(
                b"bad-context",
                await kit.forge(value, encryption_context={"envpipe:stream": "other"}),
            ),
        ),
        (
            "key_not_allowed",
            Rec(b"bad-key", await kit.forge(value, kms_key_id=header.kms_key_id + "-not-allowed")),
        ),
        ("bad_tag", Rec(b"bad-other-key", value)),  # the AAD binds the record key
    ]
    envelopes = [Rec(r.key, v, (VERSION_HEADER,)) for r, v in zip(good, sealed, strict=True)]
    metadata = await kit.produce(bootstrap, enc, [*envelopes, *(rec for _, rec in bad)])
    decrypt = await workers.decrypt(
        enc, dec, dlq, kit.name("g"), "--stop-when-idle", IDLE, name="dec"
    )
    assert await decrypt.wait(90) == 0, decrypt.tail()

    opened = await kit.read(bootstrap, dec)
    assert Counter((r.key, r.value) for r in opened) == Counter((r.key, r.value) for r in good)
    kit.assert_dead_letters_by_source(
        await kit.read(bootstrap, dlq),
        [*(("", r) for r in envelopes), *bad],
        metadata,
        enc,
    )
    assert decrypt.stats()["kms_calls"]["unwrap"] == 1  # the one good DEK; none for the forged


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_bad_records_are_dead_lettered_and_good_ones_arrive(
    dev_env: DevEnv, workers: Workers
) -> None:
    bootstrap = dev_env.bootstrap_servers
    plain, enc, dec, dlq = (kit.name(f"bad-{part}") for part in ("plain", "enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, plain)
    originals = [
        Rec(r.key, r.value, (("n", r.key or b""),)) for r in kit.keyed(300, 150, prefix="good")
    ]
    await kit.produce(bootstrap, plain, originals)
    encrypt = await workers.encrypt(plain, enc, kit.name("g"), "--stop-when-idle", IDLE, name="enc")
    assert await encrypt.wait(90) == 0, encrypt.tail()
    sample = (await kit.read(bootstrap, enc))[0]
    header, _ = decode_header(sample.value)
    wrapped_at = sample.value.index(header.wrapped_dek) + len(header.wrapped_dek) // 2
    signature_at = sample.value.index(header.signature) + 5

    async with kit.moto(dev_env) as (kms, client):
        foreign_key = (await client.create_key(Description="not on the allowlist"))["KeyMetadata"]
        foreign = kit.encryptor(kms, dev_env, plain, kms_key_id=foreign_key["Arn"])
        foreign_value = await foreign.seal(MARKER + b"sealed under a foreign key", b"bad-foreign")
        await foreign.close()

    headers = (*sample.headers, ("n", b"bad"))
    value = sample.value
    bad = [  # (expected reason, record)
        ("bad_tag", Rec(b"bad-ciphertext", kit.flip(value, len(value) - 1), headers)),
        ("bad_tag", Rec(b"bad-other-key", value, headers)),  # the AAD binds the record key
        ("bad_signature", Rec(b"bad-wrapped-dek", kit.flip(value, wrapped_at), headers)),
        ("bad_signature", Rec(b"bad-signature", kit.flip(value, signature_at), headers)),
        ("malformed", Rec(b"bad-version-byte", kit.flip(value, 0), headers)),  # version -2
        ("unknown_version", Rec(b"bad-future", b"\x06" + value[1:], headers)),  # version 3
        ("malformed", Rec(b"bad-not-v2", b"\x04" + value[1:], headers)),  # v2's byte, v1's body
        ("malformed", Rec(b"bad-plaintext", b'{"card": "4111 1111 1111 1111"}', (("n", b"p"),))),
        ("key_not_allowed", Rec(b"bad-foreign", foreign_value, headers)),
    ]
    metadata = await kit.produce(bootstrap, enc, [rec for _, rec in bad])

    decrypt = await workers.decrypt(
        enc, dec, dlq, kit.name("g"), "--stop-when-idle", IDLE, name="dec"
    )
    assert await decrypt.wait(90) == 0, decrypt.tail()

    opened = await kit.read(bootstrap, dec)
    assert Counter(map(Rec.of, opened)) == Counter(
        Rec.of(r) for r in await kit.read(bootstrap, plain)
    )
    kit.assert_dead_letters(await kit.read(bootstrap, dlq), bad, metadata, enc)
    stats = decrypt.stats()
    assert stats["dlq"] == len(bad)
    assert stats["records_out"] == len(originals)


# --- 4b. a record that cannot be sealed -----------------------------------------------------

_MAX_REQUEST = 1 << 20  # aiokafka's default max_request_size, which the worker keeps


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_encrypt_dead_letters_a_record_it_cannot_write_or_stops_without_a_dlq(
    dev_env: DevEnv, workers: Workers
) -> None:
    """Its envelope would be too large to produce: DLQ it, or stop and never commit past it."""
    bootstrap = dev_env.bootstrap_servers
    plain = kit.name("big-plain")
    await kit.create_topic(bootstrap, plain, partitions=1)
    small = kit.keyed(100, 100)
    big = Rec(b"big", MARKER + b"\0" * (_MAX_REQUEST - 300))  # fits; its envelope does not
    records = [*small[:50], big, *small[50:]]
    metadata = await kit.produce(bootstrap, plain, records)
    enc, dlq, enc2 = kit.name("big-enc"), kit.name("big-dlq"), kit.name("big-enc2")
    with_dlq = await workers.encrypt(
        plain, enc, kit.name("g"), "--dlq", dlq, "--stop-when-idle", IDLE, name="with-dlq"
    )
    group = kit.name("g")
    without = await workers.encrypt(plain, enc2, group, "--stop-when-idle", IDLE, name="no-dlq")
    assert await with_dlq.wait(90) == 0, with_dlq.tail()
    assert await without.wait(90) == 1, without.tail()

    assert {r.key for r in await kit.read(bootstrap, enc)} == {r.key for r in small}
    (letter,) = await kit.read(bootstrap, dlq)
    assert (letter.key, letter.value) == (big.key, big.value)
    assert dict(letter.headers) == {
        ERROR_HEADER: b"too_large",
        SOURCE_HEADER: f"{plain}/0/{metadata[50].offset}".encode(),
    }
    assert "reason=too_large" in without.log.read_text()
    assert (await kit.committed(bootstrap, group, plain, partitions=1))[0] <= metadata[50].offset


# --- 5. scale-out ----------------------------------------------------------------------------


async def _produce_steadily(bootstrap: str, topic: str, until: asyncio.Event) -> list[Rec]:
    """Produce 500 records every 0.1 s until `until` is set; returns what was produced."""
    produced: list[Rec] = []
    while not until.is_set():
        chunk = kit.keyed(500, 200, prefix=f"s{len(produced):07d}-")
        await kit.produce(bootstrap, topic, chunk)
        produced.extend(chunk)
        await asyncio.sleep(0.1)
    return produced


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_second_worker_takes_over_partitions_under_load(
    dev_env: DevEnv, workers: Workers
) -> None:
    """The second worker joins mid-stream: the first commits on revocation, nothing is lost."""
    bootstrap = dev_env.bootstrap_servers
    plain, enc, group = kit.name("two-plain"), kit.name("two-enc"), kit.name("g")
    await kit.create_topic(bootstrap, plain)
    stop = asyncio.Event()
    producing = asyncio.ensure_future(_produce_steadily(bootstrap, plain, stop))
    try:
        first = await workers.encrypt(plain, enc, group, "--stop-when-idle", "4", name="w1")
        async with Tail(bootstrap, enc) as tail:
            await tail.wait_for(1, within=60)
        second = await workers.encrypt(plain, enc, group, "--stop-when-idle", "4", name="w2")
        await kit.logged(first, "partitions revoked: ")  # the first commits what it did
        await kit.logged(second, f"partitions assigned: {plain}/")
        await asyncio.sleep(2)  # both run under load for a while
    finally:
        stop.set()
        originals = await producing
    for proc in (first, second):
        assert await proc.wait(90) == 0, proc.tail()

    held = [set(proc.stats()["assigned_partitions"]) for proc in (first, second)]
    assert all(held), f"a worker never got a partition: {held}"
    assert held[0] | held[1] == {f"{plain}/{p}" for p in range(3)}
    assert second.stats()["records_in"] > 0
    sealed = await kit.read(bootstrap, enc)
    assert {r.key for r in sealed} == {r.key for r in originals}
    print(f"two workers, {len(originals)} records: {held}, {kit.duplicates(sealed)} duplicates")


# --- 6. SIGTERM ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_sigterm_drains_and_commits_exactly_what_was_written(
    dev_env: DevEnv, workers: Workers
) -> None:
    bootstrap = dev_env.bootstrap_servers
    run = await _interrupt_encrypt(bootstrap, workers, signal.SIGTERM)
    assert run.exit_code == 0

    # Everything written is committed, and everything committed was written: a graceful
    # stop leaves nothing to redo.
    committed = await kit.committed(bootstrap, run.group, run.plain)
    source = await kit.read(bootstrap, run.plain)
    sealed = await kit.read(bootstrap, run.enc)
    assert len(sealed) < len(run.originals)
    assert {r.key for r in sealed} == {r.key for r in source if r.offset < committed[r.partition]}
    assert kit.duplicates(sealed) == 0

    sealed = await _restart(bootstrap, workers, run)
    print(f"SIGTERM after {run.written} records: {kit.duplicates(sealed)} duplicates after restart")
    assert kit.duplicates(sealed) == 0
