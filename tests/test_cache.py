"""DEK cache policy, with an in-memory KMS and a controllable clock (pure logic, no network)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections import Counter

import pytest

from pipeline.cache import DecryptDekCache, DekPolicy, EncryptDekCache
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.envelope import decode_header
from pipeline.errors import (
    ConfigError,
    DecryptionError,
    DekExhaustedError,
    KmsUnavailableError,
    Reason,
)
from pipeline.kms.counting import CountingKms
from pipeline.kms.memory import InMemoryKms

OUTAGE = KmsUnavailableError("generate_data_key", "ThrottlingException")


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build(
    policy: DekPolicy, *, latency: float = 0.0, clock: FakeClock | None = None
) -> tuple[Encryptor, CountingKms, InMemoryKms]:
    memory = InMemoryKms(latency=latency)
    memory.create_key("alias/wrap")
    memory.create_signing_key("alias/sign")
    kms = CountingKms(memory)
    cache = EncryptDekCache(policy, clock=clock or time.monotonic)
    encryptor = Encryptor(
        kms, kms_key_id="alias/wrap", signing_key_id="alias/sign", stream="s", cache=cache
    )
    return encryptor, kms, memory


def dek_ids(values: list[bytes]) -> list[bytes]:
    """Distinct DEK ids in order of first use."""
    seen: list[bytes] = []
    for value in values:
        dek_id = decode_header(value)[0].dek_id
        if dek_id not in seen:
            seen.append(dek_id)
    return seen


async def settle() -> None:
    """Let background mint tasks finish (a mint is a handful of awaits on the KMS)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_rotates_at_record_limit() -> None:
    encryptor, kms, _ = build(DekPolicy(max_records=10, refresh_at=0.5))
    values = []
    for _ in range(35):
        values.append(await encryptor.seal(b"x"))
        await settle()
    per_dek = Counter(decode_header(value)[0].dek_id for value in values)
    assert sorted(per_dek.values()) == [5, 10, 10, 10]
    assert kms.calls["generate_data_key"] == kms.calls["sign"] >= 4
    assert encryptor.cache.stats["rotate"] == 3


async def test_rotates_at_byte_limit() -> None:
    encryptor, _, _ = build(DekPolicy(max_bytes=1000, refresh_at=0.5))
    values = []
    for _ in range(10):
        values.append(await encryptor.seal(b"y" * 300))
        await settle()
    assert len(dek_ids(values)) == 4  # 3 records of 300 B per 1000 B key
    with pytest.raises(ConfigError, match="ENVPIPE_DEK_MAX_BYTES"):
        # a single record above the byte limit can never fit; refuse rather than loop
        await asyncio.wait_for(encryptor.seal(b"z" * 1001), timeout=2)


async def test_rotates_at_age_limit() -> None:
    clock = FakeClock()
    encryptor, _, _ = build(DekPolicy(max_age_seconds=60), clock=clock)
    first = await encryptor.seal(b"a")
    clock.now += 30
    assert dek_ids([first, await encryptor.seal(b"b")]) == dek_ids([first])
    clock.now += 20  # 50 s: past 80 %, refresh starts in the background
    await encryptor.seal(b"c")
    await settle()
    clock.now += 11  # 61 s: the old DEK is retired, the refreshed one takes over
    later = await encryptor.seal(b"d")
    assert len(dek_ids([first, later])) == 2
    assert encryptor.cache.stats["rotate"] == 1


async def test_refresh_ahead_hides_kms_latency() -> None:
    latency = 0.03  # per call; a mint is two round trips (60 ms), inside the 100 ms window
    encryptor, kms, _ = build(DekPolicy(max_records=100, refresh_at=0.5), latency=latency)
    await encryptor.seal(b"warm")  # the first DEK must be fetched: that one waits
    slowest = 0.0
    for _ in range(600):
        started = time.perf_counter()
        await encryptor.seal(b"r")
        slowest = max(slowest, time.perf_counter() - started)
        await asyncio.sleep(0.002)  # 50 records (the refresh window) take 100 ms > latency
    assert encryptor.cache.stats["rotate"] >= 5
    assert slowest < latency / 2, f"a seal waited {slowest * 1000:.1f} ms on the KMS"
    assert kms.calls["generate_data_key"] >= 6


async def test_concurrent_misses_make_one_kms_call() -> None:
    encryptor, kms, _ = build(DekPolicy(), latency=0.05)
    sealed = await asyncio.gather(*(encryptor.seal(b"v%d" % i) for i in range(50)))
    assert len(dek_ids(list(sealed))) == 1
    assert kms.calls["generate_data_key"] == 1
    assert kms.calls["sign"] == 1

    memory = InMemoryKms(latency=0.05)
    counting = CountingKms(memory)
    wrap, sign = memory.create_key(), memory.create_signing_key()
    other = Encryptor(counting, kms_key_id=wrap, signing_key_id=sign, stream="s")
    values = await other.seal_many([(b"p%d" % i, None) for i in range(50)])
    decryptor = Decryptor(counting, allowed_kms_keys=[wrap], allowed_signing_keys=[sign])
    before = counting.calls["unwrap"]
    opened = await asyncio.gather(*(decryptor.open(value) for value in values))
    assert opened == [b"p%d" % i for i in range(50)]
    assert counting.calls["unwrap"] - before == 1


async def test_grace_period_while_kms_is_down_never_passes_record_limit() -> None:
    clock = FakeClock()
    policy = DekPolicy(max_age_seconds=10, max_records=50, grace_seconds=30)
    encryptor, _, memory = build(policy, clock=clock)
    first = await encryptor.seal(b"a")
    memory.fail_with = OUTAGE
    clock.now += 11  # past the age limit; the KMS cannot mint: grace
    graced = [await encryptor.seal(b"g") for _ in range(20)]
    await settle()
    assert dek_ids([first, *graced]) == dek_ids([first])
    assert encryptor.cache.stats["grace"] >= 20
    # the record limit is a hard limit: 50 records, then refuse
    for _ in range(29):
        await encryptor.seal(b"g")
    with pytest.raises(DekExhaustedError):
        await encryptor.seal(b"over")
    # the KMS comes back: after the backoff the worker's retry succeeds with a new DEK
    memory.fail_with = None
    clock.now += 60
    recovered = await encryptor.seal(b"back")
    assert len(dek_ids([first, recovered])) == 2


async def test_grace_period_ends() -> None:
    clock = FakeClock()
    encryptor, _, memory = build(DekPolicy(max_age_seconds=10, grace_seconds=5), clock=clock)
    await encryptor.seal(b"a")
    memory.fail_with = OUTAGE
    clock.now += 11
    await encryptor.seal(b"in grace")
    clock.now += 6
    with pytest.raises(DekExhaustedError):
        await encryptor.seal(b"after grace")


async def test_no_dek_at_all_while_kms_down_is_retriable_not_plaintext() -> None:
    encryptor, kms, memory = build(DekPolicy())
    memory.fail_with = OUTAGE
    with pytest.raises(DekExhaustedError) as caught:
        await encryptor.seal(b"secret")
    assert caught.value.retriable
    # backoff: an immediate second attempt does not call the KMS again
    calls = kms.calls["generate_data_key"]
    with pytest.raises(DekExhaustedError):
        await encryptor.seal(b"secret")
    assert kms.calls["generate_data_key"] == calls


async def test_encrypt_cache_drops_retired_deks() -> None:
    encryptor, _, _ = build(DekPolicy(max_records=3, refresh_at=0.5))
    await encryptor.seal(b"x")
    cache = encryptor.cache
    (slot,) = cache._slots.values()
    assert slot.current is not None
    first = weakref.ref(slot.current.sealer)
    for _ in range(7):
        await encryptor.seal(b"x")
        await settle()
    gc.collect()
    assert first() is None, "a retired DEK is still referenced"


def opener_stub(tag: int) -> object:
    from pipeline.aead import Opener

    return Opener(bytes([tag]) * 32, b"h%d" % tag, b"s")


async def test_decrypt_lru_bound_and_no_reference_to_evicted_deks() -> None:
    cache = DecryptDekCache(max_entries=3)
    refs = []
    for tag in range(10):
        opener = opener_stub(tag)
        refs.append(weakref.ref(opener))

        async def admit(value: object = opener) -> object:
            return value

        await cache.load(b"h%d" % tag, admit)  # type: ignore[arg-type]
        del opener
    assert len(cache) == 3
    assert cache.stats["evict"] == 7
    gc.collect()
    assert [ref() is None for ref in refs] == [True] * 7 + [False] * 3


async def test_decrypt_idle_ttl() -> None:
    clock = FakeClock()
    cache = DecryptDekCache(idle_seconds=60, clock=clock)

    async def admit() -> object:
        return opener_stub(1)

    await cache.load(b"h1", admit)  # type: ignore[arg-type]
    clock.now += 59
    assert cache.get(b"h1") is not None
    clock.now += 59  # used 59 s ago: still fresh
    assert cache.get(b"h1") is not None
    clock.now += 61
    assert cache.get(b"h1") is None


async def test_negative_cache_stops_amplification() -> None:
    clock = FakeClock()
    cache = DecryptDekCache(negative_seconds=10, clock=clock)
    calls = 0

    async def failing_admit() -> object:
        nonlocal calls
        calls += 1
        raise DecryptionError(Reason.UNWRAP_FAILED)

    for _ in range(100):
        with pytest.raises(DecryptionError):
            await cache.load(b"bad", failing_admit)  # type: ignore[arg-type]
    assert calls == 1
    clock.now += 11
    with pytest.raises(DecryptionError):
        await cache.load(b"bad", failing_admit)  # type: ignore[arg-type]
    assert calls == 2


async def test_retriable_failures_are_not_remembered() -> None:
    cache = DecryptDekCache(negative_seconds=10)
    calls = 0

    async def flaky_admit() -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KmsUnavailableError("unwrap", "ThrottlingException")
        return opener_stub(2)

    with pytest.raises(KmsUnavailableError):
        await cache.load(b"h", flaky_admit)  # type: ignore[arg-type]
    assert await cache.load(b"h", flaky_admit) is not None  # type: ignore[arg-type]
