"""Key rotation without restarts, through running workers (about 50 s in all).

A configured alias (aws) or key name (vault) is resolved again for every new DEK, so with a
short `ENVPIPE_DEK_MAX_AGE_SECONDS` a re-pointed alias or a rotated Vault key shows up in the
headers of a running encrypt worker's output within about one DEK age; the tests print that
delay (never assert it). Readers that allow both keys open every record. For Vault, a reader
fetches a new signing-key version's public key on first sight, and forged version numbers
cannot make it read `keys/<name>` once per number (`pipeline.kms.vault_versions`).

Each test makes keys of its own (a fresh alias, fresh transit keys), so the session's dev keys
are left as they were for every other test.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from benchmarks.rigs.kms_proxy import KmsFaultProxy
from pipeline.cache import DekPolicy, EncryptDekCache
from pipeline.encryptor import Encryptor
from pipeline.envelope import Header, decode_header
from pipeline.errors import KeyUnavailableError
from pipeline.keyids import KeyAllowlist
from pipeline.kms import CountingKms, InMemoryKms
from pipeline.kms.vault_ids import parse_key_id
from pipeline.kms.vault_versions import SigningVersions
from pipeline.trust import HeaderVerifier
from tests import kit
from tests.kit import Proc, Rec, Tail, Workers
from workers.dev import DevEnv, openbao

DEK_AGE = 2.0  # ENVPIPE_DEK_MAX_AGE_SECONDS of the encrypt workers here
#: 40 every 0.1 s, live until the changes are seen (at most about 25 s), the rest at once: a
#: slow worker start on a loaded machine must not end the stream before the last change.
RECORDS = 10_000


def header_of(record: Any) -> Header:
    return decode_header(record.value)[0]


async def first_arrival(tail: Tail, matches: Callable[[Header], bool], within: float) -> float:
    """Wait until a record whose header `matches` arrives; the wall time it was seen."""
    deadline = time.monotonic() + within
    seen = 0
    while time.monotonic() < deadline:
        await tail.poll(0.02)
        if any(matches(header_of(r)) for r in tail.records[seen:] if r.value is not None):
            return time.time()
        seen = len(tail.records)
    pytest.fail(f"no record with the new key within {within}s")


def assert_switches_once(sealed: Sequence[Any], field: Callable[[Header], object]) -> list[Any]:
    """Per partition, `field` changes at most once (old, then new): the values, in order."""
    by_partition: defaultdict[int, list[object]] = defaultdict(list)
    for record in sorted(sealed, key=lambda r: (r.partition, r.offset)):
        value = field(header_of(record))
        if not by_partition[record.partition] or by_partition[record.partition][-1] != value:
            by_partition[record.partition].append(value)
    for partition, values in by_partition.items():
        assert len(values) <= 2, (partition, values)
    return sorted({v for values in by_partition.values() for v in values}, key=str)


def report(what: str, changed_at: float, seen_at: float, sealed: Sequence[Any], new: Any) -> None:
    """Print the rotation delay: re-point to the first record under the new key."""
    produced = min(r.timestamp for r in sealed if new(header_of(r))) / 1000
    print(
        f"\nrotation delay ({what}, ENVPIPE_DEK_MAX_AGE_SECONDS={DEK_AGE:g}): first record "
        f"under the new key produced {produced - changed_at:.2f}s and seen on the encrypted "
        f"topic {seen_at - changed_at:.2f}s after the change"
    )


async def rotating_writer(pool: Workers, plain: str, enc: str, **env: str) -> Proc:
    """An encrypt worker with a short DEK age that stops 3 s after the stream ends."""
    return await pool.encrypt(
        plain,
        enc,
        kit.name("g"),
        "--stop-when-idle",
        "3",
        name="enc",
        ENVPIPE_DEK_MAX_AGE_SECONDS=str(DEK_AGE),
        **env,
    )


async def rotate_mid_stream(
    bootstrap: str,
    plain: str,
    enc: str,
    changes: Sequence[tuple[str, Callable[[], Awaitable[object]], Callable[[Header], bool]]],
) -> list[tuple[str, float, float]]:
    """Stream RECORDS into `plain`; 3 s in, make each change and wait for its effect on `enc`,
    then send the rest of the records at once.

    Returns (what, changed at, first seen at) per change.
    """
    records = kit.keyed(RECORDS, 120)
    changed = asyncio.Event()
    stream = asyncio.create_task(
        kit.produce_steadily(bootstrap, plain, records, chunk=40, pause=0.1, until=changed)
    )
    timings = []
    try:
        async with Tail(bootstrap, enc) as tail:
            await tail.wait_for(1, within=60)
            await asyncio.sleep(3)
            for what, change, matches in changes:
                changed_at = time.time()
                await change()
                timings.append((what, changed_at, await first_arrival(tail, matches, 30)))
                await asyncio.sleep(1)
    finally:
        changed.set()
    await stream
    return timings


# --- aws: re-point an alias ------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_a_repointed_alias_takes_over_without_a_restart(
    dev_env: DevEnv, workers: Workers
) -> None:
    bootstrap = dev_env.bootstrap_servers
    plain, enc, dec, dlq = (kit.name(f"rot-{part}") for part in ("plain", "enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, plain)
    old_kek, old_signer = dev_env.kms_key_canonical, dev_env.signing_key_canonical
    async with kit.moto(dev_env) as (_, client):
        new_kek = (await client.create_key(Description="rotated to"))["KeyMetadata"]["Arn"]
        new_signer = (await client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY"))[
            "KeyMetadata"
        ]["Arn"]
        wrapping, signing = kit.name("alias/rotation"), kit.name("alias/rotation-signing")
        await client.create_alias(AliasName=wrapping, TargetKeyId=old_kek)
        await client.create_alias(AliasName=signing, TargetKeyId=old_signer)
        encrypt = await rotating_writer(
            workers, plain, enc, ENVPIPE_KMS_KEY_ID=wrapping, ENVPIPE_SIGNING_KEY_ID=signing
        )

        def repoint(alias: str, arn: str) -> Callable[[], Awaitable[object]]:
            return lambda: client.update_alias(AliasName=alias, TargetKeyId=arn)

        timings = await rotate_mid_stream(
            bootstrap,
            plain,
            enc,
            [
                ("wrapping alias", repoint(wrapping, new_kek), lambda h: h.kms_key_id == new_kek),
                (
                    "signing alias",
                    repoint(signing, new_signer),
                    lambda h: h.signing_key_id == new_signer,
                ),
            ],
        )
        assert await encrypt.wait(60) == 0, encrypt.tail()

    sealed = await kit.read(bootstrap, enc)
    assert len(sealed) == RECORDS
    assert assert_switches_once(sealed, lambda h: h.kms_key_id) == sorted([old_kek, new_kek])
    assert assert_switches_once(sealed, lambda h: h.signing_key_id) == sorted(
        [old_signer, new_signer]
    )
    for (what, changed_at, seen_at), new in zip(
        timings,
        (lambda h: h.kms_key_id == new_kek, lambda h: h.signing_key_id == new_signer),
        strict=True,
    ):
        report(what, changed_at, seen_at, sealed, new)

    decrypt = await workers.decrypt(
        enc,
        dec,
        dlq,
        kit.name("g"),
        "--stop-when-idle",
        kit.IDLE,
        name="dec",
        ENVPIPE_ALLOWED_KMS_KEYS=f"{old_kek},{new_kek}",
        ENVPIPE_ALLOWED_SIGNING_KEYS=f"{old_signer},{new_signer}",
    )
    assert await decrypt.wait(60) == 0, decrypt.tail()
    opened = await kit.read(bootstrap, dec)
    source = await kit.read(bootstrap, plain)
    assert Counter(map(Rec.of, opened)) == Counter(map(Rec.of, source))
    assert decrypt.stats()["dlq"] == 0


# --- vault: rotate the transit keys ----------------------------------------------------------


@pytest.mark.parametrize("provider_env", ["vault"], indirect=True)
@pytest.mark.timeout(150)
async def test_vault_rotation_and_forged_versions(
    provider_env: DevEnv, provider_workers: Workers
) -> None:
    env, bootstrap = provider_env, provider_env.bootstrap_servers
    api = openbao.Api(env.variables["VAULT_ADDR"], env.variables["VAULT_TOKEN"])
    name = kit.name("rotation")
    api.call("POST", f"transit/keys/{name}", {"type": "aes256-gcm96"})
    api.call("POST", f"transit/keys/{name}-signing", {"type": "ecdsa-p256"})
    wrapping, signing = f"vault:transit:{name}", f"vault:transit:{name}-signing"
    plain, enc, dec, dlq = (kit.name(f"vrot-{part}") for part in ("plain", "enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, plain)
    await kit.create_topic(bootstrap, enc)  # the reader starts first
    keys = {"ENVPIPE_KMS_KEY_ID": wrapping, "ENVPIPE_SIGNING_KEY_ID": signing}

    async with KmsFaultProxy(env.variables["VAULT_ADDR"]) as proxy:  # counts the reader's calls
        reader = await provider_workers.decrypt(
            enc,
            dec,
            dlq,
            kit.name("g"),
            name="reader",
            VAULT_ADDR=proxy.endpoint,
            ENVPIPE_ALLOWED_KMS_KEYS=wrapping,
            ENVPIPE_ALLOWED_SIGNING_KEYS=signing,  # no version: every version of the key
        )
        encrypt = await rotating_writer(provider_workers, plain, enc, **keys)
        timings = await rotate_mid_stream(
            bootstrap,
            plain,
            enc,
            [
                (
                    "vault wrapping key",
                    lambda: asyncio.to_thread(api.call, "POST", f"transit/keys/{name}/rotate"),
                    lambda h: h.wrapped_dek.startswith(b"vault:v2:"),
                ),
                (
                    "vault signing key",
                    lambda: asyncio.to_thread(
                        api.call, "POST", f"transit/keys/{name}-signing/rotate"
                    ),
                    lambda h: h.signing_key_id == f"{signing}:2",
                ),
            ],
        )
        assert await encrypt.wait(60) == 0, encrypt.tail()
        async with Tail(bootstrap, dec) as opened_tail:
            await opened_tail.wait_for(RECORDS, within=60)
        path = f"/v1/transit/keys/{name}-signing"
        assert proxy.count("pass", path) == 2  # first sight of version 1, then of version 2

        sealed = await kit.read(bootstrap, enc)
        forged = [
            Rec(
                f"forged-{version}".encode(),
                await kit.forge(sealed[-1].value, signing_key_id=f"{signing}:{version}"),
                tuple(sealed[-1].headers),
            )
            for version in range(1_000, 1_040)
        ]
        started = time.monotonic()
        await kit.produce(bootstrap, enc, forged)
        async with Tail(bootstrap, dlq) as dead:
            await dead.wait_for(len(forged), within=60)
        window = time.monotonic() - started
        reader.signal(signal.SIGTERM)
        assert await reader.wait(60) == 0, reader.tail()
        forged_reads = proxy.count("pass", path) - 2

    assert len(sealed) == RECORDS
    assert assert_switches_once(sealed, lambda h: h.wrapped_dek[:9]) == [b"vault:v1:", b"vault:v2:"]
    assert assert_switches_once(sealed, lambda h: h.signing_key_id) == [
        f"{signing}:1",
        f"{signing}:2",
    ]
    report(timings[0][0], *timings[0][1:], sealed, lambda h: h.wrapped_dek.startswith(b"vault:v2"))
    report(timings[1][0], *timings[1][1:], sealed, lambda h: h.signing_key_id.endswith(":2"))
    source = await kit.read(bootstrap, plain)
    assert Counter(map(Rec.of, await kit.read(bootstrap, dec))) == Counter(map(Rec.of, source))
    stats = reader.stats()
    assert stats["dlq_reasons"] == {"key_unavailable": len(forged)}
    assert stats["records_in"] == stats["records_out"] + stats["dlq"] == RECORDS + len(forged)
    # 40 forged version numbers: at most one keys/<name> read per 5 s, not one per number.
    assert 0 <= forged_reads <= 1 + math.ceil(window / 5), (forged_reads, window)
    print(f"\n{len(forged)} forged signing-key versions cost {forged_reads} keys/<name> reads")


# --- the bounds on public-key lookups, in process --------------------------------------------


async def test_a_failed_public_key_lookup_is_remembered_per_id() -> None:
    inner = InMemoryKms()
    counting = CountingKms(inner)
    verifier = HeaderVerifier(
        counting, allowed_kms_keys=KeyAllowlist(()), allowed_signing_keys=KeyAllowlist(())
    )
    gone = inner.create_signing_key()
    inner.destroy(gone)
    for _ in range(50):
        with pytest.raises(KeyUnavailableError):
            await verifier.public_key(gone)
    assert counting.calls["public_key"] == 1
    for index in range(5):  # each forged id is a lookup of its own: hence vault_versions
        with pytest.raises(KeyUnavailableError):
            await verifier.public_key(f"{gone}-{index}")
    assert counting.calls["public_key"] == 6


async def test_signing_versions_reads_once_per_interval_and_at_once_for_the_next() -> None:
    now = [100.0]
    reads: list[str] = []
    latest = [1]

    async def read(operation: str, ref: Any) -> dict[str, Any]:
        reads.append(operation)
        versions = {str(v): {"public_key": "pem"} for v in range(1, latest[0] + 1)}
        return {"type": "ecdsa-p256", "latest_version": latest[0], "keys": versions}

    versions = SigningVersions(read, refetch_seconds=5, clock=lambda: now[0])
    key = parse_key_id("vault:transit:signing:1", version=True)
    assert "1" in (await versions.get("public_key", key))["keys"]
    for forged in range(7, 57):  # all refused from the last read
        assert str(forged) not in (await versions.get("public_key", key.at(forged)))["keys"]
    assert len(reads) == 1
    latest[0] = 2  # rotated: the next version is read at once, within the interval
    assert "2" in (await versions.get("public_key", key.at(2)))["keys"]
    assert len(reads) == 2
    now[0] += 5
    await versions.get("public_key", key.at(99))
    assert len(reads) == 3  # one read per interval for unknown versions


async def test_after_an_idle_gap_the_next_record_uses_the_repointed_alias() -> None:
    """Nothing is fetched ahead while no record arrives; the first one after the DEK's age
    waits for a new DEK under the alias as it points now, not a grace period on the old."""
    now = [0.0]
    kms = InMemoryKms()
    old, new = kms.create_key("alias/orders"), kms.create_key()
    cache = EncryptDekCache(DekPolicy(max_age_seconds=10), clock=lambda: now[0])
    encryptor = Encryptor(
        kms,
        kms_key_id="alias/orders",
        signing_key_id=kms.create_signing_key(),
        stream="orders",
        cache=cache,
    )
    first = await encryptor.seal(b"before")
    kms.point_alias("alias/orders", new)
    now[0] += 60
    after = await encryptor.seal(b"after an idle minute")
    await encryptor.close()
    assert [decode_header(value)[0].kms_key_id for value in (first, after)] == [old, new]
    assert cache.stats["grace"] == 0
