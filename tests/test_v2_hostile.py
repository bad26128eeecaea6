"""Hostile v2 input: forged keys-topic headers and misdirected records.

Whatever an attacker writes to the keys topic, a reader refuses it with the v1 reason and
without asking the service to unwrap anything; the count is taken at the service (a
`CountingKms` around the in-memory KMS in process, the `KmsFaultProxy`'s request count in
front of moto through a decrypt worker). The one case that costs an unwrap is a record that
names a real dek_id it was not sealed under: the legitimate unwrap of that DEK, no more,
then `bad_tag`. About 12 s.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, replace
from typing import Any

import pytest

from benchmarks.rigs.kms_proxy import KmsFaultProxy
from pipeline import envelope_v2
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.envelope import Header, encode_header, signed_bytes
from pipeline.errors import DecryptionError, Reason
from pipeline.keys_topic import InMemoryHeaders, KeysTopicReader
from pipeline.kms import CountingKms
from pipeline.kms.memory import InMemoryKms
from pipeline.types import HeaderSource, Kms
from tests import kit
from tests.kit import IDLE, Rec, Workers
from tests.test_format_v2 import V2_HEADER, dek_id_of, publish_headers
from workers import inspect
from workers.dev import DevEnv

RECORD_KEY = b"order-1"
FOREIGN_WRAPPING_KEY = "arn:aws:kms:us-east-1:999999999999:key/00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class World:
    """Three DEKs (a, b, c) sealed for real under the allowed keys: one record each under
    `RECORD_KEY`, and the header each writer published."""

    sealed: dict[str, bytes]
    headers: dict[str, bytes]

    def header(self, name: str) -> Header:
        return envelope_v2.decode_keys_header(self.headers[name], dek_id_of(self.sealed[name]))

    def dek_id(self, name: str) -> bytes:
        return dek_id_of(self.sealed[name])


@dataclass(frozen=True)
class Forgery:
    """What an attacker puts in the keys topic (under `dek_id`), the record that points at
    it, and the reason a reader must give."""

    name: str
    dek_id: bytes
    header: bytes
    record: bytes
    reason: Reason


async def seal_world(kms: Kms, wrapping_key: str, signing_key: str, stream: str) -> World:
    sealed, headers = {}, {}
    for name in "abc":
        sink = InMemoryHeaders()
        encryptor = Encryptor(
            kms,
            kms_key_id=wrapping_key,
            signing_key_id=signing_key,
            stream=stream,
            format="v2",
            header_sink=sink,
        )
        sealed[name] = await encryptor.seal(f"the order under DEK {name}".encode(), RECORD_KEY)
        await encryptor.close()
        headers[name] = sink.get(dek_id_of(sealed[name])) or b""
    return World(sealed, headers)


async def resign(kms: Kms, header: Header, signing_key: str) -> Header:
    """`header` signed over its own bytes S by `signing_key`, as a holder of that key would."""
    signed = replace(header, signing_key_id=signing_key, signature=b"")
    message = signed_bytes(signed)
    return replace(
        signed, signature=await kms.sign(signing_key, message, hashlib.sha256(message).digest())
    )


def pointing(record: bytes, dek_id: bytes) -> bytes:
    """A v2 record with its body kept and the dek_id it names replaced."""
    return envelope_v2.record_prefix(dek_id) + record[envelope_v2.PREFIX_SIZE :]


async def forgeries(kms: Kms, world: World, foreign_signing_key: str) -> list[Forgery]:
    """The catalogue; `kms` holds the allowed signing key and `foreign_signing_key`."""
    a, b, c = world.header("a"), world.header("b"), world.header("c")
    signer = a.signing_key_id
    foreign, wrapping, altered, copied, edited, trailing, v1 = (
        secrets.token_bytes(16) for _ in range(7)
    )

    async def signed(key: str, **changes: Any) -> Header:
        return await resign(kms, replace(a, **changes), key)

    def aimed(dek_id: bytes, header: bytes, reason: Reason, name: str) -> Forgery:
        return Forgery(name, dek_id, header, pointing(world.sealed["a"], dek_id), reason)

    bent = await signed(signer, dek_id=altered)
    bent = replace(bent, signature=bent.signature[:-1] + bytes([bent.signature[-1] ^ 1]))
    return [
        aimed(
            foreign,
            encode_header(await signed(foreign_signing_key, dek_id=foreign)),
            Reason.KEY_NOT_ALLOWED,
            "signed by a foreign key",
        ),
        aimed(
            wrapping,
            encode_header(await signed(signer, dek_id=wrapping, kms_key_id=FOREIGN_WRAPPING_KEY)),
            Reason.KEY_NOT_ALLOWED,
            "a foreign wrapping key",
        ),
        aimed(altered, encode_header(bent), Reason.BAD_SIGNATURE, "signature altered"),
        aimed(copied, world.headers["a"], Reason.MALFORMED, "re-keyed under another dek_id"),
        aimed(
            edited,
            encode_header(replace(a, dek_id=edited)),
            Reason.BAD_SIGNATURE,
            "re-keyed, dek_id edited inside",
        ),
        aimed(
            trailing,
            encode_header(await signed(signer, dek_id=trailing)) + b"\x00",
            Reason.MALFORMED,
            "trailing bytes after the header",
        ),
        aimed(  # a genuine-looking v1 header: the keys topic holds version 2 only
            v1,
            encode_header(await signed(signer, dek_id=v1, version=1)),
            Reason.UNKNOWN_VERSION,
            "a v1 header",
        ),
        Forgery(
            "wrapped_dek replaced",
            c.dek_id,
            encode_header(replace(c, wrapped_dek=b.wrapped_dek)),
            world.sealed["c"],
            Reason.BAD_SIGNATURE,
        ),
    ]


# --- in process: CountingKms around the in-memory KMS ----------------------------------------


@dataclass(frozen=True)
class Setup:
    memory: InMemoryKms
    wrapping_key: str
    signing_key: str
    world: World
    forgeries: list[Forgery]

    def reader(self, source: HeaderSource) -> tuple[Decryptor, CountingKms]:
        """A reader trusting only the configured keys, with its own service-call counter."""
        kms = CountingKms(self.memory)
        decryptor = Decryptor(
            kms,
            allowed_kms_keys=[self.wrapping_key],
            allowed_signing_keys=[self.signing_key],
            header_source=source,
        )
        return decryptor, kms


@pytest.fixture(scope="module")
async def setup() -> Setup:
    memory = InMemoryKms()
    wrapping_key, signing_key = memory.create_key(), memory.create_signing_key()
    world = await seal_world(memory, wrapping_key, signing_key, "orders")
    return Setup(
        memory,
        wrapping_key,
        signing_key,
        world,
        await forgeries(memory, world, memory.create_signing_key()),
    )


FORGERY_NAMES = [
    "signed by a foreign key",
    "a foreign wrapping key",
    "signature altered",
    "re-keyed under another dek_id",
    "re-keyed, dek_id edited inside",
    "trailing bytes after the header",
    "a v1 header",
    "wrapped_dek replaced",
]


@pytest.mark.parametrize("name", FORGERY_NAMES)
async def test_a_forged_header_is_refused_without_an_unwrap(setup: Setup, name: str) -> None:
    (forgery,) = [f for f in setup.forgeries if f.name == name]
    world = setup.world
    keys = {world.dek_id("a"): world.headers["a"], world.dek_id("b"): world.headers["b"]}
    keys[forgery.dek_id] = forgery.header  # what the reader loaded from the keys topic
    decryptor, kms = setup.reader(keys)

    with pytest.raises(DecryptionError) as refused:
        await decryptor.open(forgery.record, RECORD_KEY)
    assert refused.value.reason is forgery.reason
    assert kms.calls["unwrap"] == 0
    # inspect, which never unwraps, gives the same verdict
    verdict, _, _ = await inspect.examine(decryptor, forgery.record, keys)
    assert verdict == forgery.reason.value
    # the genuine record under DEK a still opens: one unwrap, the legitimate one
    assert await decryptor.open(world.sealed["a"], RECORD_KEY) == b"the order under DEK a"
    assert kms.calls["unwrap"] == 1


async def test_a_record_aimed_at_a_real_dek_it_was_not_sealed_under_costs_one_unwrap(
    setup: Setup,
) -> None:
    world = setup.world
    keys = {world.dek_id(name): world.headers[name] for name in "ab"}
    decryptor, kms = setup.reader(keys)
    misdirected = pointing(world.sealed["b"], world.dek_id("a"))  # b's body, a's dek_id

    for _ in range(3):
        with pytest.raises(DecryptionError) as refused:
            await decryptor.open(misdirected, RECORD_KEY)
        assert refused.value.reason is Reason.BAD_TAG
    assert await decryptor.open(world.sealed["a"], RECORD_KEY) == b"the order under DEK a"
    assert kms.calls["unwrap"] == 1  # a's, once; b's DEK was never asked for


async def test_a_second_header_for_a_dek_id_cannot_replace_the_first(
    setup: Setup, dev_env: DevEnv
) -> None:
    """Through a real keys topic: the reader keeps the first header it saw for a dek_id."""
    bootstrap, world = dev_env.bootstrap_servers, setup.world
    a, b = world.header("a"), world.header("b")
    keys_topic = kit.name("v2hostile-keys")
    later = encode_header(replace(a, wrapped_dek=b.wrapped_dek))  # b's DEK behind a's dek_id
    await publish_headers(
        bootstrap, keys_topic, [(a.dek_id, world.headers["a"]), (a.dek_id, later)]
    )
    reader = await KeysTopicReader.open(keys_topic, bootstrap_servers=bootstrap, follow=False)
    try:
        decryptor, kms = setup.reader(reader)
        assert await decryptor.open(world.sealed["a"], RECORD_KEY) == b"the order under DEK a"
    finally:
        await reader.close()
    assert reader.get(a.dek_id) == world.headers["a"]
    assert reader.conflicts == 1
    assert kms.calls["unwrap"] == 1


# --- through a decrypt worker, counted at the service ----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_the_decrypt_worker_refuses_a_hostile_keys_topic_with_one_unwrap(
    dev_env: DevEnv, workers: Workers
) -> None:
    bootstrap = dev_env.bootstrap_servers
    enc, dec, dlq = (kit.name(f"v2hostile-{part}") for part in ("enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, enc)
    async with kit.moto(dev_env) as (kms, client):
        created = await client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
        world = await seal_world(kms, dev_env.kms_key_canonical, dev_env.signing_key_canonical, enc)
        catalogue = await forgeries(kms, world, created["KeyMetadata"]["Arn"])
    a = world.header("a")
    # The keys topic, in order: a's real header, every forgery, then a later header for a.
    entries = [(a.dek_id, world.headers["a"])]
    entries += [(forgery.dek_id, forgery.header) for forgery in catalogue]
    entries.append((a.dek_id, encode_header(replace(a, wrapped_dek=world.header("b").wrapped_dek))))
    await publish_headers(bootstrap, f"{enc}.keys", entries)

    genuine = Rec(RECORD_KEY, world.sealed["a"], (V2_HEADER,))
    # The bodies were sealed under RECORD_KEY (the AAD binds it), so every record carries
    # that key; the DLQ check tells them apart by offset (envpipe.source).
    hostile = [
        (forgery.reason.value, Rec(RECORD_KEY, forgery.record, (V2_HEADER,)))
        for forgery in catalogue
    ]
    hostile.append(
        ("bad_tag", Rec(RECORD_KEY, pointing(world.sealed["b"], a.dek_id), (V2_HEADER,)))
    )
    records = [("", genuine), *hostile]
    metadata = await kit.produce(bootstrap, enc, [rec for _, rec in records])

    async with KmsFaultProxy(dev_env.kms_endpoint) as proxy:
        worker = await workers.decrypt(
            enc,
            dec,
            dlq,
            kit.name("g"),
            "--stop-when-idle",
            IDLE,
            name="hostile",
            ENVPIPE_KMS_ENDPOINT=proxy.endpoint,
        )
        assert await worker.wait(90) == 0, worker.tail()
    assert proxy.count("pass", "Decrypt") == 1  # DEK a's, for the genuine record
    assert proxy.count("pass", "GetPublicKey") == 1  # the foreign key's was never fetched
    opened = await kit.read(bootstrap, dec)
    assert [(r.key, r.value) for r in opened] == [(RECORD_KEY, b"the order under DEK a")]
    kit.assert_dead_letters_by_source(await kit.read(bootstrap, dlq), records, metadata, enc)
    assert worker.stats()["kms_calls"]["unwrap"] == 1
    assert "second, different header" in worker.log.read_text()
