"""Issue 5, reliability and hostile input, end to end: a real broker, the KMS emulator and
the workers as subprocesses.

Already covered elsewhere, and not repeated here: one kill -9 of an encrypt worker, KMS
outages through the fault proxy and the dead-letter test with an envelope moved to another
record key and one JSON plaintext (test_stream.py); forged headers and the negative cache
in-process, counted inside the client (test_crypto_kms.py); bit flips and random bytes with
hypothesis (test_hostile.py). This file adds:

1. a frozen broker (SIGSTOP for 10 s) under a busy encrypt + decrypt pipeline;
2. repeated kill -9 of both workers at random moments over 50,000 records;
3. KMS amplification counted at the KMS's door (the fault proxy), through a real decrypt
   worker: 10,000 forged records cost no Decrypt call, and bad wrapped DEKs under a valid
   signature cost at most one per distinct header per negative-cache period;
4. plaintext injected into the encrypted topic, dressed up as envelopes, and genuine
   envelopes moved between null, empty and other record keys: DLQ only, never the output.

The figures (kills, lost, duplicates, KMS calls) are printed, so `pytest -s` shows them,
and written as JSON to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.rigs.kms_proxy import KmsFaultProxy
from pipeline.encryptor import Encryptor
from pipeline.envelope import VERSION_HEADER, decode_envelope, encode_long
from tests import kit
from tests.kit import MARKER, Proc, Rec, Tail, Workers
from workers import dev
from workers.dev import DevEnv

# --- helpers ---------------------------------------------------------------------------------


def _lost(originals: list[Rec], output: list[Any]) -> int:
    """Input records (key and value) missing from `output`; also fails on foreign output."""
    expected = {(r.key, r.value) for r in originals}
    seen = {(r.key, r.value) for r in output}
    assert seen <= expected, f"{len(seen - expected)} output records were never produced"
    return len(expected - seen)


def _assert_no_marker(records: list[Any], what: str) -> None:
    leaks = [r.key for r in records if MARKER in (r.value or b"") or MARKER in (r.key or b"")]
    assert not leaks, f"plaintext on {what}: {leaks[:5]}"


async def _run_pipeline(pool: Workers, topics: dict[str, str], *extra: str) -> dict[str, Proc]:
    """An encrypt worker (plain -> enc) and a decrypt worker (enc -> dec, DLQ)."""
    encrypt = await pool.encrypt(
        topics["plain"], topics["enc"], topics["enc-group"], *extra, name="encrypt"
    )
    decrypt = await pool.decrypt(
        topics["enc"], topics["dec"], topics["dlq"], topics["dec-group"], *extra, name="decrypt"
    )
    return {"encrypt": encrypt, "decrypt": decrypt}


class _Follow:
    """Tails several topics in the background, so a test can look at their counts any time."""

    def __init__(self, bootstrap: str, *topics: str) -> None:
        self._tails = {topic: Tail(bootstrap, topic) for topic in topics}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Follow:
        for tail in self._tails.values():
            await tail.__aenter__()
        self._task = asyncio.ensure_future(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for tail in self._tails.values():
            await tail.__aexit__(None, None, None)

    async def _poll(self) -> None:
        while True:
            for tail in self._tails.values():
                await tail.poll(0.05)

    def count(self, topic: str) -> int:
        return len(self._tails[topic].records)

    def keys(self, topic: str) -> set[bytes | None]:
        return {record.key for record in self._tails[topic].records}


def _topics(prefix: str) -> dict[str, str]:
    parts = ("plain", "enc", "dec", "dlq", "enc-group", "dec-group")
    return {part: kit.name(f"{prefix}-{part}") for part in parts}


# --- 1. the broker freezes -------------------------------------------------------------------

STALL_SECONDS = 10
#: Longer than the stall, so no worker takes the frozen broker for the end of its input.
STALL_IDLE = "15"
STALL_BACKLOG, STALL_STREAM = 40_000, 10_000


@pytest.mark.slow
@pytest.mark.timeout(200)
async def test_workers_recover_from_a_frozen_broker(tmp_path: Path) -> None:
    """SIGSTOP the broker for 10 s mid-stream: the workers carry on by themselves afterwards.

    A backlog makes sure both workers are busy when the broker freezes (fetches, produce
    acknowledgements, heartbeats and commits all hang); a live stream keeps coming after.
    """
    state = tmp_path / "svc"  # its own broker: freezing it cannot hurt other tests
    env = dev.up(state)
    pool = Workers(env, tmp_path)
    frozen = False
    started = time.monotonic()
    try:
        bootstrap = env.bootstrap_servers
        topics = _topics("stall")
        for topic in (topics["plain"], topics["enc"]):
            await kit.create_topic(bootstrap, topic)
        originals = kit.keyed(STALL_BACKLOG + STALL_STREAM, 1024)
        backlog, stream = originals[:STALL_BACKLOG], originals[STALL_BACKLOG:]
        await kit.produce(bootstrap, topics["plain"], backlog)
        procs = await _run_pipeline(pool, topics, "--stop-when-idle", STALL_IDLE)
        async with Tail(bootstrap, topics["dec"]) as tail:
            producing = asyncio.ensure_future(
                kit.produce_steadily(bootstrap, topics["plain"], stream, chunk=500, pause=0.2)
            )
            at_freeze = await tail.wait_for(1_000, within=60)
            os.kill(env.broker_pid, signal.SIGSTOP)
            frozen = True
        assert at_freeze < len(backlog), "the backlog was done before the broker froze"
        await asyncio.sleep(STALL_SECONDS)
        os.kill(env.broker_pid, signal.SIGCONT)
        frozen = False
        await asyncio.wait_for(producing, 120)
        codes = {role: await proc.wait(150) for role, proc in procs.items()}
        assert codes == {"encrypt": 0, "decrypt": 0}, {r: p.tail() for r, p in procs.items()}

        sealed = await kit.read(bootstrap, topics["enc"])
        opened = await kit.read(bootstrap, topics["dec"])
        _assert_no_marker(sealed, "the encrypted topic")
        assert await kit.count(bootstrap, topics["dlq"]) == 0
        assert {r.key for r in sealed} == {r.key for r in originals}
        lost = _lost(originals, opened)
        summary = {
            "stall_seconds": STALL_SECONDS,
            "records": len(originals),
            "decrypted_at_freeze": at_freeze,
            "lost": lost,
            "duplicates_encrypted": kit.duplicates(sealed),
            "duplicates_decrypted": kit.duplicates(opened),
            "pauses": {role: proc.stats()["pauses"] for role, proc in procs.items()},
            "seconds": round(time.monotonic() - started, 1),
        }
        (tmp_path / "broker-stall.json").write_text(json.dumps(summary, indent=2))
        print(f"\nbroker stall: {json.dumps(summary)}")
        assert lost == 0
    finally:
        if frozen:
            os.kill(env.broker_pid, signal.SIGCONT)
        await pool.close()
        dev.down(state)


# --- 2. kill -9, again and again -------------------------------------------------------------

KILLS = 6
KILL_RECORDS = 50_000
#: Small batches and a small in-flight limit (about 3,700 records/s instead of 60,000): the
#: workers stay busy, so a kill lands on records between fetch and commit.
KILL_ENV = {"ENVPIPE_BATCH_MAX_RECORDS": "50", "ENVPIPE_MAX_INFLIGHT_RECORDS": "50"}


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_repeated_kill_9_of_both_workers_loses_nothing(
    dev_env: DevEnv, workers: Workers, tmp_path: Path
) -> None:
    """Kill -9 the encrypt or the decrypt worker at random moments while a stream flows.

    A killed consumer never leaves its group, so its replacement waits for the dead member's
    session to expire (aiokafka's 10 s; the workers have no setting for it) before it gets
    the partitions. Kills are spread over both workers, so those waits overlap. The stream is
    paced until the last kill, then the rest of the 50,000 records goes out at once.
    """
    rng = random.Random(5)  # the kill moments and targets; change it to explore
    bootstrap = dev_env.bootstrap_servers
    topics = _topics("kill")
    for topic in (topics["plain"], topics["enc"]):  # not left to the broker's auto-creation
        await kit.create_topic(bootstrap, topic)
    originals = kit.keyed(KILL_RECORDS, 200)
    sources = {"encrypt": topics["plain"], "decrypt": topics["enc"]}
    outputs = {"encrypt": topics["enc"], "decrypt": topics["dec"]}
    generation = Counter[str]()

    async def start(role: str) -> Proc:
        generation[role] += 1
        name = f"{role}-{generation[role]}"
        if role == "encrypt":
            return await workers.encrypt(
                topics["plain"], topics["enc"], topics["enc-group"], name=name, **KILL_ENV
            )
        return await workers.decrypt(
            topics["enc"], topics["dec"], topics["dlq"], topics["dec-group"], name=name, **KILL_ENV
        )

    def processing(proc: Proc, role: str) -> bool:
        return f"partitions assigned: {sources[role]}/" in proc.log.read_text(errors="replace")

    started = time.monotonic()
    procs = {role: await start(role) for role in sources}
    killed = asyncio.Event()
    producing = asyncio.ensure_future(
        kit.produce_steadily(
            bootstrap, topics["plain"], originals, chunk=250, pause=0.4, until=killed
        )
    )
    kills: list[dict[str, Any]] = []
    async with _Follow(bootstrap, topics["plain"], topics["enc"], topics["dec"]) as follow:
        upstream = {"encrypt": topics["plain"], "decrypt": topics["enc"]}
        try:
            while len(kills) < KILLS:
                ready = [role for role, proc in procs.items() if processing(proc, role)]
                never = [role for role in sources if all(k["role"] != role for k in kills)]
                if KILLS - len(kills) <= len(never):  # make sure both kinds get killed
                    ready = [role for role in ready if role in never]
                if not ready:
                    await asyncio.sleep(0.1)
                    continue
                role = rng.choice(ready)
                await asyncio.sleep(rng.uniform(0.2, 3.0))
                victim = procs[role]
                victim.kill()
                assert await victim.wait(10) == -signal.SIGKILL
                done, todo = follow.count(outputs[role]), follow.count(upstream[role])
                kills.append(
                    {
                        "worker": victim.name,
                        "role": role,
                        "at_s": round(time.monotonic() - started, 1),
                        "streaming": not producing.done(),
                        "input_so_far": todo,  # as far as the test had read it
                        "output_so_far": done,
                    }
                )
                procs[role] = await start(role)
        finally:
            killed.set()
            await asyncio.wait_for(producing, 180)

        # Run to completion: both replacements at work, every key decrypted; then SIGTERM.
        for role, proc in procs.items():
            await kit.logged(proc, f"partitions assigned: {sources[role]}/", within=60)
        wanted = {r.key for r in originals}
        deadline = time.monotonic() + 120
        while missing := len(wanted - follow.keys(topics["dec"])):
            if time.monotonic() > deadline:
                logs = {role: proc.tail() for role, proc in procs.items()}
                pytest.fail(f"{missing} records never arrived decrypted: {logs}")
            await asyncio.sleep(1.0)
    for proc in procs.values():
        proc.signal(signal.SIGTERM)
    for proc in procs.values():
        assert await proc.wait(60) == 0, proc.tail()

    sealed = await kit.read(bootstrap, topics["enc"])
    opened = await kit.read(bootstrap, topics["dec"])
    _assert_no_marker(sealed, "the encrypted topic")
    assert await kit.count(bootstrap, topics["dlq"]) == 0
    assert {r.key for r in sealed} == wanted
    lost = _lost(originals, opened)
    summary = {
        "records": len(originals),
        "kills": len(kills),
        "killed": dict(Counter(k["role"] for k in kills)),
        "lost": lost,
        "duplicates_encrypted": kit.duplicates(sealed),
        "duplicates_decrypted": kit.duplicates(opened),
        "seconds": round(time.monotonic() - started, 1),
        "kill_log": kills,
    }
    (tmp_path / "kill-9.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nkill -9: {summary['kills']} kills {summary['killed']}, {lost} lost, "
        f"{summary['duplicates_encrypted']} duplicates encrypted, "
        f"{summary['duplicates_decrypted']} decrypted, {summary['seconds']} s"
    )
    assert lost == 0
    assert len(kills) >= 5
    assert set(summary["killed"]) == {"encrypt", "decrypt"}
    assert all(kill["streaming"] for kill in kills), "a kill came after the stream ended"


# --- 3. KMS amplification, counted at the KMS's door -----------------------------------------

FORGED_PER_KIND = 2_500  # four kinds: 10,000 forged records
SIGNED_VARIANTS = 500  # distinct, properly signed headers per signed kind (Sign calls on moto)
BAD_DEK_REPEATS = 200  # each bad wrapped DEK, in that many records spread over the stream
GOOD_RECORDS = 50


class KmsLedger:
    """What the decrypt worker asked the KMS, as the fault proxy saw it."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.decrypted_blobs: Counter[bytes] = Counter()
        self.public_keys: Counter[str] = Counter()

    def __call__(self, operation: str, request: bytes, response: bytes) -> None:
        self.calls[operation] += 1
        body = json.loads(request or b"{}")
        if operation == "Decrypt":
            self.decrypted_blobs[base64.b64decode(body["CiphertextBlob"])] += 1
        elif operation == "GetPublicKey":
            self.public_keys[body["KeyId"]] += 1

    def decrypts(self, blobs: set[bytes]) -> int:
        return sum(n for blob, n in self.decrypted_blobs.items() if blob in blobs)


async def _variants(
    base: bytes, count: int, sign: Callable[[bytes], Awaitable[bytes]], **changes: Any
) -> list[bytes]:
    """`count` envelopes with distinct headers (fresh dek_id), each signed by `sign`."""
    limit = asyncio.Semaphore(8)

    async def one() -> bytes:
        async with limit:
            return await kit.forge(base, sign=sign, dek_id=secrets.token_bytes(16), **changes)

    return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_forged_headers_cost_no_kms_call_and_bad_deks_one_per_header(
    dev_env: DevEnv, workers: Workers, tmp_path: Path
) -> None:
    """A real decrypt worker behind the fault proxy, fed 10,000 forged records and 1,000
    validly signed ones with bad wrapped DEKs, shuffled among good ones.

    Forged (0 Decrypt calls allowed, whatever the caching):
      foreign   signed by an ECC key created on the KMS but not on the allowlist
      impostor  claims the allowlisted signing key, signed by that foreign key
      flipped   a genuine header with one byte of its signature changed (its wrapped DEK is
                genuine: a Decrypt call would succeed, so only the order of checks saves it)
      kms-key   genuinely signed, but wrapped under a KMS key not on the allowlist
    Bad DEKs (at most one Decrypt per distinct header per ENVPIPE_NEGATIVE_CACHE_SECONDS):
      five headers, properly signed by the allowlisted key, whose wrapped DEK KMS refuses.
    """
    bootstrap = dev_env.bootstrap_servers
    enc, dec, dlq = (kit.name(f"amp-{part}") for part in ("enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, enc)
    rng = random.Random(11)

    async with kit.moto(dev_env) as (kms, client):
        foreign_signer = (await client.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256"))[
            "KeyMetadata"
        ]["Arn"]
        foreign_wrapper = (await client.create_key(Description="not on the allowlist"))[
            "KeyMetadata"
        ]["Arn"]

        async def ours(message: bytes) -> bytes:
            return await kms.sign(
                dev_env.signing_key_canonical, message, hashlib.sha256(message).digest()
            )

        async def theirs(message: bytes) -> bytes:
            return await kms.sign(foreign_signer, message, hashlib.sha256(message).digest())

        sealers = {
            "good": kit.encryptor(kms, dev_env, enc),
            "base": kit.encryptor(kms, dev_env, enc),  # another DEK, for the flipped kind
            "attacker": Encryptor(
                kms, kms_key_id=dev_env.kms_key_canonical, signing_key_id=foreign_signer, stream=enc
            ),
            "kms-key": kit.encryptor(kms, dev_env, enc, kms_key_id=foreign_wrapper),
        }
        good = kit.keyed(GOOD_RECORDS, 120, prefix="good-")
        good_sealed = await sealers["good"].seal_many([(r.value or b"", r.key) for r in good])
        payload = MARKER + b" forged"
        base = {
            name: await sealer.seal(payload, b"x")
            for name, sealer in sealers.items()
            if name != "good"
        }
        for sealer in sealers.values():
            await sealer.close()

        signature = decode_envelope(base["base"]).header.signature
        forged: dict[str, list[bytes]] = {
            "foreign": await _variants(base["attacker"], SIGNED_VARIANTS, theirs),
            "impostor": await _variants(
                base["attacker"],
                SIGNED_VARIANTS,
                theirs,
                signing_key_id=dev_env.signing_key_canonical,
            ),
            "kms-key": await _variants(base["kms-key"], SIGNED_VARIANTS, ours),
            "flipped": [  # byte i % len XOR a mask: 2,500 distinct signatures
                await kit.forge(base["base"], signature=_xor(signature, i))
                for i in range(FORGED_PER_KIND)
            ],
        }
        real_blob = decode_envelope(good_sealed[0]).header.wrapped_dek
        foreign_blob = (  # not the kms-key kind's blob: every blob must name one kind
            await client.generate_data_key(KeyId=foreign_wrapper, KeySpec="AES_256")
        )["CiphertextBlob"]
        bad_blobs = {
            "ones": b"\x01" * 150,
            "random": random.Random(3).randbytes(180),
            "truncated": real_blob[:-16],
            "bit-flipped": kit.flip(real_blob, len(real_blob) // 2),
            "other-key": foreign_blob,  # a real blob, but of a key the header does not name
        }
        bad_deks = {
            name: await kit.forge(good_sealed[0], sign=ours, wrapped_dek=blob)
            for name, blob in bad_blobs.items()
        }

    reasons = {
        "foreign": "key_not_allowed",
        "impostor": "bad_signature",
        "kms-key": "key_not_allowed",
        "flipped": "bad_signature",
    }
    headers = (VERSION_HEADER,)
    bad: list[tuple[str, Rec]] = []
    for kind, values in forged.items():
        for i in range(FORGED_PER_KIND):
            bad.append(
                (reasons[kind], Rec(f"{kind}-{i:05d}".encode(), values[i % len(values)], headers))
            )
    for name, value in bad_deks.items():
        for i in range(BAD_DEK_REPEATS):
            bad.append(("unwrap_failed", Rec(f"dek-{name}-{i:04d}".encode(), value, headers)))
    good_records = [Rec(r.key, v, headers) for r, v in zip(good, good_sealed, strict=True)]
    stream = [*bad, *(("", rec) for rec in good_records)]
    rng.shuffle(stream)
    metadata = await kit.produce(bootstrap, enc, [rec for _, rec in stream])

    ledger = KmsLedger()
    async with KmsFaultProxy(dev_env.kms_endpoint) as proxy:
        proxy.observer = ledger
        worker = await workers.decrypt(
            enc,
            dec,
            dlq,
            kit.name("g"),
            "--stop-when-idle",
            kit.IDLE,
            name="decrypt-amp",
            ENVPIPE_KMS_ENDPOINT=proxy.endpoint,
            # Longer than the run: "per period" must not depend on how fast this machine is.
            ENVPIPE_NEGATIVE_CACHE_SECONDS="600",
        )
        assert await worker.wait(120) == 0, worker.tail()
    assert sum(proxy.requests.values()) == sum(ledger.calls.values())  # every call seen

    forged_blobs = {decode_envelope(v).header.wrapped_dek for vs in forged.values() for v in vs}
    good_blob = decode_envelope(good_sealed[0]).header.wrapped_dek
    assert not forged_blobs & ({good_blob} | set(bad_blobs.values()))
    per_bad_dek = {name: ledger.decrypted_blobs[blob] for name, blob in bad_blobs.items()}
    summary = {
        "forged_records": sum(reason != "unwrap_failed" for reason, _ in bad),
        "forged_distinct_headers": sum(len(set(v)) for v in forged.values()),
        "decrypt_calls_for_forged": ledger.decrypts(forged_blobs),
        "bad_dek_records": len(bad_deks) * BAD_DEK_REPEATS,
        "decrypt_calls_per_bad_dek": per_bad_dek,
        "decrypt_calls_for_good": ledger.decrypted_blobs[good_blob],
        "kms_calls": dict(ledger.calls),
        "public_keys_fetched": dict(ledger.public_keys),
    }
    (tmp_path / "amplification.json").write_text(json.dumps(summary, indent=2))
    print(f"\namplification: {json.dumps(summary)}")

    assert summary["forged_records"] == 4 * FORGED_PER_KIND == 10_000
    assert summary["decrypt_calls_for_forged"] == 0
    assert all(calls <= 1 for calls in per_bad_dek.values()), per_bad_dek
    assert summary["decrypt_calls_for_good"] == 1
    assert ledger.calls["Decrypt"] == 1 + sum(per_bad_dek.values())  # nothing else unwrapped
    assert set(ledger.public_keys) == {dev_env.signing_key_canonical}  # never the foreign key's
    assert not {"GenerateDataKey", "Sign"} & set(ledger.calls)

    kit.assert_dead_letters(
        await kit.read(bootstrap, dlq),
        [(reason, rec) for reason, rec in stream if reason],
        [meta for (reason, _), meta in zip(stream, metadata, strict=True) if reason],
        enc,
    )
    opened = await kit.read(bootstrap, dec)
    assert Counter((r.key, r.value) for r in opened) == Counter((r.key, r.value) for r in good)
    stats = worker.stats()
    assert stats["dlq"] == len(bad)
    assert stats["kms_calls"].get("unwrap", 0) == ledger.calls["Decrypt"]


def _xor(data: bytes, variant: int) -> bytes:
    """`data` with one byte changed; distinct for each variant below 255 * len(data)."""
    changed = bytearray(data)
    changed[variant % len(data)] ^= 1 + variant // len(data)
    return bytes(changed)


# --- 4. plaintext injection and envelopes moved to other record keys ---------------------------

INJECTED = b"INJECTED-PLAINTEXT-5d0c"


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_injected_plaintext_and_moved_envelopes_go_to_the_dlq_only(
    dev_env: DevEnv, workers: Workers
) -> None:
    """What the dead-letter test in test_stream.py does not try: plaintext dressed up as an
    envelope, and valid envelopes moved between null, empty and other record keys."""
    bootstrap = dev_env.bootstrap_servers
    enc, dec, dlq = (kit.name(f"inj-{part}") for part in ("enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, enc)
    good = [
        *kit.keyed(20, 200, prefix="good-"),
        Rec(None, MARKER + b" keyless"),
        Rec(b"", MARKER + b" empty key"),
    ]
    async with kit.moto(dev_env) as (kms, _):
        sealer = kit.encryptor(kms, dev_env, enc)
        sealed = await sealer.seal_many([(r.value or b"", r.key) for r in good])
        await sealer.close()
    header_bytes = decode_envelope(sealed[0]).header_bytes
    keyed, keyless, empty_key = sealed[0], sealed[-2], sealed[-1]
    version = (VERSION_HEADER,)
    plain = INJECTED + b' {"card": "4111 1111 1111 1111"}'
    bad = [  # (reason, record): every one goes to the DLQ with its original bytes
        # plaintext in the encrypted topic, some of it made to look like an envelope
        ("malformed", Rec(b"inj-json", plain, version)),  # with a forged envpipe.v header
        ("malformed", Rec(None, plain, version)),
        ("malformed", Rec(b"inj-empty", b"", version)),
        ("malformed", Rec(b"inj-v1-prefix", b"\x02" + plain, version)),  # varint 1 = v1
        ("malformed", Rec(b"inj-v2-prefix", b"\x04" + plain, version)),  # varint 2 = v2
        ("unknown_version", Rec(b"inj-v3-prefix", b"\x06" + plain, version)),  # a future one
        ("malformed", Rec(b"inj-after-header", header_bytes + plain, version)),
        (  # a genuine header, the plaintext framed as nonce + ciphertext: the tag fails
            "bad_tag",
            Rec(
                b"inj-framed",
                header_bytes + plain[:12] + encode_long(len(plain) - 12) + plain[12:],
                version,
            ),
        ),
        # genuine envelopes under another record key than they were sealed for
        ("bad_tag", Rec(b"good-0000000\x00", keyed, version)),  # the key, extended
        ("bad_tag", Rec(b"good-000000", keyed, version)),  # the key, shortened
        ("bad_tag", Rec(b"", keyed, version)),
        ("bad_tag", Rec(None, keyed, (*version, ("was-key", b"good-0000000")))),
        ("bad_tag", Rec(b"moved-keyless", keyless, version)),
        ("bad_tag", Rec(b"", keyless, (*version, ("was", b"null")))),  # null vs empty key
        ("bad_tag", Rec(None, empty_key, (*version, ("was", b"empty")))),
    ]
    records = [*bad] + [("", Rec(r.key, v, version)) for r, v in zip(good, sealed, strict=True)]
    random.Random(2).shuffle(records)
    metadata = await kit.produce(bootstrap, enc, [rec for _, rec in records])

    worker = await workers.decrypt(
        enc, dec, dlq, kit.name("g"), "--stop-when-idle", kit.IDLE, name="decrypt-inj"
    )
    assert await worker.wait(90) == 0, worker.tail()

    opened = await kit.read(bootstrap, dec)
    assert Counter((r.key, r.value) for r in opened) == Counter((r.key, r.value) for r in good)
    assert not [r for r in opened if INJECTED in (r.value or b"")]
    letters = await kit.read(bootstrap, dlq)
    kit.assert_dead_letters_by_source(letters, records, metadata, enc)
    print(f"\ninjection: {len(bad)} bad records dead-lettered, {len(good)} good decrypted")
