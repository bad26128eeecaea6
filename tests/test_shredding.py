"""Crypto-shredding through real decrypt workers (about 50 s in all).

Vault (hard delete) and PKCS#11 (the object destroyed): the shredded tenant's records go to
the decrypt DLQ as `key_unavailable` with their original bytes, every other tenant's open,
the worker never stops, and records read = opened + dead-lettered, from its stats file. A
DEK the running reader had already unwrapped stays usable until it leaves the cache; SIGHUP
drops the cache, after which the shredded tenant's records are refused at once.

moto accepts every key in every state, so AWS's answers for a disabled key, a key pending
deletion and a missing key are made by `KmsFaultProxy` in AWS's exact shapes, on Decrypt only.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from benchmarks.rigs.kms_proxy import KmsFaultProxy, Mode
from pipeline.cache import DekPolicy, EncryptDekCache
from pipeline.config import load_settings
from pipeline.encryptor import Encryptor
from pipeline.envelope import VERSION_HEADER, decode_header
from pipeline.errors import Reason
from pipeline.kms import InMemoryKms, open_kms
from tests import kit
from tests.kit import IDLE, Rec, Tail, Workers
from tests.test_tenants import Tenants, strip_version, tenant_records
from workers.dev import DevEnv

SHREDDED = "globex"


async def seal_for_tenants(
    env: DevEnv, template: str, stream: str, plain: Sequence[Rec]
) -> list[Rec]:
    """Envelopes of `plain` as an encrypt worker writes them, sealed in this process (one
    DEK per tenant, so later parts reuse the DEKs a running reader has cached)."""
    environ = {**env.as_environ(), "ENVPIPE_KMS_KEY_ID": template}
    settings = load_settings(environ=environ)
    kms = await open_kms(settings, environ)
    encryptor = await Encryptor.from_settings(kms, settings, stream=stream)
    try:
        sealed = await encryptor.seal_many(
            [(r.value or b"", r.key) for r in plain], headers=[r.headers for r in plain]
        )
    finally:
        await encryptor.close()
        await kms.close()
    assert all(isinstance(value, bytes) for value in sealed)
    return [
        Rec(r.key, value, (*r.headers, VERSION_HEADER))  # type: ignore[arg-type]
        for r, value in zip(plain, sealed, strict=True)
    ]


def of_tenant(records: Sequence[Rec], name: str, *, keep: bool = True) -> list[Rec]:
    return [r for r in records if (dict(r.headers)["tenant"] == name.encode()) == keep]


def opened(records: Sequence[Any]) -> Counter[Rec]:
    return Counter(map(strip_version, records))


def plain_of(records: Sequence[Rec], originals: dict[bytes | None, Rec]) -> Counter[Rec]:
    return Counter(originals[r.key] for r in records)


@pytest.mark.parametrize("provider_env", ["vault", "pkcs11"], indirect=True)
@pytest.mark.timeout(150)
async def test_a_shredded_tenant_is_dead_lettered_and_the_others_open(
    request: pytest.FixtureRequest, provider_env: DevEnv, provider_workers: Workers
) -> None:
    env, bootstrap = provider_env, provider_env.bootstrap_servers
    tenants = await Tenants.create(request, env, ["acme", SHREDDED, "initech"])
    enc, dec, dlq, group = (kit.name(f"shred-{part}") for part in ("enc", "dec", "dlq", "g"))
    await kit.create_topic(bootstrap, enc)
    plain = tenant_records(list(tenants.canonical), 150)
    originals = {r.key: r for r in plain}
    sealed = await seal_for_tenants(env, tenants.template, enc, plain)
    before, cached, after = sealed[:150], of_tenant(sealed[150:300], SHREDDED), sealed[300:]
    produced = [*before, *cached, *after]
    allowed = {"ENVPIPE_ALLOWED_KMS_KEYS": tenants.allowlist}

    reader = await provider_workers.decrypt(enc, dec, dlq, group, name="running", **allowed)
    async with Tail(bootstrap, dec) as out, Tail(bootstrap, dlq) as dead:
        await kit.produce(bootstrap, enc, before)
        await out.wait_for(len(before), within=60)
        await tenants.destroy(SHREDDED)
        # The running reader still holds the shredded tenant's unwrapped DEK: it opens.
        await kit.produce(bootstrap, enc, cached)
        await out.wait_for(len(before) + len(cached), within=60)
        reader.signal(signal.SIGHUP)
        await kit.logged(reader, "SIGHUP: dropped every cached data key")
        await kit.produce(bootstrap, enc, after)
        refused = of_tenant(after, SHREDDED)
        await dead.wait_for(len(refused), within=60)
        await out.wait_for(len(before) + len(cached) + len(after) - len(refused), within=60)
        reader.signal(signal.SIGTERM)
        assert await reader.wait(60) == 0, reader.tail()
    assert opened(out.records) == plain_of(
        [*before, *cached, *of_tenant(after, SHREDDED, keep=False)], originals
    )
    running = reader.stats()
    assert running["dlq_reasons"] == {"key_unavailable": len(refused)}
    assert running["records_in"] == running["records_out"] + running["dlq"] == len(produced)

    # A reader that starts after the shredding refuses every record of that tenant.
    fresh = await provider_workers.decrypt(
        enc,
        kit.name("dec"),
        (fresh_dlq := kit.name("dlq")),
        kit.name("g"),
        "--stop-when-idle",
        IDLE,
        name="fresh",
        **allowed,
    )
    assert await fresh.wait(90) == 0, fresh.tail()
    shredded = of_tenant(produced, SHREDDED)
    letters = await kit.read(bootstrap, fresh_dlq)
    assert Counter((r.key, r.value) for r in letters) == Counter((r.key, r.value) for r in shredded)
    assert {dict(r.headers)["envpipe.error"] for r in letters} == {b"key_unavailable"}
    stats = fresh.stats()
    assert stats["records_in"] == stats["records_out"] + stats["dlq"] == len(produced)
    assert stats["dlq"] == len(shredded)


@pytest.mark.timeout(120)
async def test_aws_key_states_are_key_unavailable_through_a_worker(
    dev_env: DevEnv, workers: Workers
) -> None:
    """Disabled, pending deletion, not found: AWS's own error payloads, on Decrypt only."""
    bootstrap = dev_env.bootstrap_servers
    enc, dec, dlq, group = (kit.name(f"states-{part}") for part in ("enc", "dec", "dlq", "g"))
    await kit.create_topic(bootstrap, enc)
    modes: list[Mode] = ["disabled", "invalid_state", "not_found", "pass"]
    plain = kit.keyed(100 * len(modes), 100)
    parts = []
    async with kit.moto(dev_env) as (kms, _):
        for index in range(len(modes)):  # one DEK per phase: each is a new Decrypt
            encryptor = kit.encryptor(kms, dev_env, enc)
            chunk = plain[index * 100 : (index + 1) * 100]
            values = await encryptor.seal_many([(r.value or b"", r.key) for r in chunk])
            await encryptor.close()
            parts.append(
                [Rec(r.key, v, (VERSION_HEADER,)) for r, v in zip(chunk, values, strict=True)]  # type: ignore[arg-type]
            )

    async with KmsFaultProxy(dev_env.kms_endpoint) as proxy:
        proxy.only = {"Decrypt"}
        reader = await workers.decrypt(
            enc, dec, dlq, group, name="states", ENVPIPE_KMS_ENDPOINT=proxy.endpoint
        )
        async with Tail(bootstrap, dlq) as dead, Tail(bootstrap, dec) as out:
            for index, (mode, part) in enumerate(zip(modes, parts, strict=True)):
                await proxy.set_mode(mode)
                await kit.produce(bootstrap, enc, part)
                if mode == "pass":
                    await out.wait_for(len(part), within=60)
                else:
                    await dead.wait_for((index + 1) * len(part), within=60)
                    assert proxy.count(mode, "Decrypt") >= 1, mode
            reader.signal(signal.SIGTERM)
            assert await reader.wait(60) == 0, reader.tail()
    letters = dead.records
    assert {r.key for r in letters} == {r.key for part in parts[:3] for r in part}
    assert {dict(r.headers)["envpipe.error"] for r in letters} == {b"key_unavailable"}
    assert Counter((r.key, r.value) for r in out.records) == Counter(
        (r.key, r.value) for r in plain[300:]
    )
    stats = reader.stats()
    assert stats["dlq_reasons"] == {"key_unavailable": 300}
    assert stats["records_in"] == stats["records_out"] + stats["dlq"] == len(plain)
    # Refused for good: one Decrypt per DEK, no retry storm.
    for mode in modes[:3]:
        assert proxy.count(mode, "Decrypt") == 1, (mode, proxy.requests)


async def test_a_writer_stops_sealing_under_a_destroyed_key_at_its_dek_limit() -> None:
    """Grace is for an outage: once the service refuses the key for good, the tenant's
    current DEK is not used past its age, and its records are `key_unavailable` (DLQ)."""
    now = [0.0]
    kms = InMemoryKms()
    acme, globex = kms.create_key("alias/tenant-acme"), kms.create_key("alias/tenant-globex")
    cache = EncryptDekCache(DekPolicy(max_age_seconds=10), clock=lambda: now[0])
    encryptor = Encryptor(
        kms,
        kms_key_id="alias/tenant-{header:tenant}",
        signing_key_id=kms.create_signing_key(),
        stream="orders",
        cache=cache,
    )
    batch = [(b"a", b"k1"), (b"g", b"k2"), (b"a", b"k3")]
    headers = [(("tenant", b"acme"),), (("tenant", b"globex"),), (("tenant", b"acme"),)]
    await encryptor.seal_many(batch, headers=headers)
    kms.destroy(acme)
    kept = await encryptor.seal_many(batch, headers=headers)  # within the age: still sealed
    now[0] += 11
    after = await encryptor.seal_many(batch, headers=headers)
    await encryptor.close()
    assert all(isinstance(value, bytes) for value in kept)
    assert [getattr(value, "reason", "sealed") for value in after] == [
        Reason.KEY_UNAVAILABLE,
        "sealed",
        Reason.KEY_UNAVAILABLE,
    ]
    assert decode_header(after[1])[0].kms_key_id == globex  # type: ignore[arg-type]
    assert cache.stats["grace"] == 0
