"""`envpipe rewrap` end to end: 50,000 envelopes moved from key A to key B (about 60 s).

The records are sealed under the dev key A in this process, then a rewrap worker opens each
one under a reader's allowlist (A) and seals it again under B, keeping key, timestamp,
headers and encryption context. A reader that allows only B then opens every record, and
`envpipe inspect --json` finds none that names A. Bad records go to the DLQ with their
original bytes and reason; tombstones stay tombstones. The throughput comes from the
worker's stats file and is printed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

import pytest

from pipeline.decryptor import Decryptor
from pipeline.envelope import VERSION_HEADER, decode_header
from tests import kit
from tests.kit import IDLE, REPO, Rec, Workers
from workers.contract import opened_headers
from workers.dev import DevEnv

RECORDS = 50_000


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_rewrap_moves_every_record_to_the_new_key(dev_env: DevEnv, workers: Workers) -> None:
    bootstrap = dev_env.bootstrap_servers
    old_key, signing = dev_env.kms_key_canonical, dev_env.signing_key_canonical
    source, dest, dlq = kit.name("rewrap-a"), kit.name("rewrap-b"), kit.name("rewrap-dlq")
    await kit.create_topic(bootstrap, source)
    plain = [
        Rec(r.key, r.value, (("n", str(i % 10).encode()),))
        for i, r in enumerate(kit.keyed(RECORDS, 200))
    ]
    async with kit.moto(dev_env) as (kms, client):
        new_key = (await client.create_key(Description="rewrapped to"))["KeyMetadata"]["Arn"]
        foreign = (await client.create_key(Description="not allowed"))["KeyMetadata"]["Arn"]
        sealer = kit.encryptor(kms, dev_env, "orders")
        values = await sealer.seal_many([(r.value or b"", r.key) for r in plain])
        await sealer.close()
        outsider = kit.encryptor(kms, dev_env, "orders", kms_key_id=foreign)
        foreign_value = await outsider.seal(b"sealed under a key nobody allows", b"bad-foreign")
        await outsider.close()
    good = [
        Rec(r.key, v, (*r.headers, VERSION_HEADER))  # type: ignore[arg-type]
        for r, v in zip(plain, values, strict=True)
    ]
    sample = good[0].value or b""
    bad = [
        ("bad_tag", Rec(b"bad-tag", kit.flip(sample, len(sample) - 1), good[0].headers)),
        ("key_not_allowed", Rec(b"bad-foreign", foreign_value, (VERSION_HEADER,))),
        ("malformed", Rec(b"bad-garbage", b"\x02not an envelope", ())),
    ]
    produced = [("", r) for r in good[: RECORDS // 2]]
    produced += [*bad, ("", Rec(b"gone", None, (("n", b"t"),))), ("", Rec(None, None))]
    produced += [("", r) for r in good[RECORDS // 2 :]]
    metadata = await kit.produce(bootstrap, source, [r for _, r in produced])
    originals = {r.key: r for r in await kit.read(bootstrap, source)}

    rewrap = await workers.start(
        "rewrap",
        *("--source", source, "--dest", dest, "--group", kit.name("g"), "--dlq", dlq),
        *("--to-key", new_key, "--stop-when-idle", IDLE),
        name="rewrap",
        ENVPIPE_ALLOWED_KMS_KEYS=old_key,
    )
    assert await rewrap.wait(180) == 0, rewrap.tail()
    stats = rewrap.stats()
    print(
        f"\nrewrap: {stats['records_in']} records in {stats['active_seconds']}s = "
        f"{stats['records_per_s']:,.0f} records/s ({stats['cpu_seconds']}s CPU); "
        f"KMS calls {stats['kms_calls']}"
    )
    assert stats["records_in"] == stats["records_out"] + stats["dlq"] == len(produced)
    assert stats["dlq_reasons"] == {reason: 1 for reason, _ in bad}
    summary = rewrap.tail(5)
    assert f"rewrap: {len(produced)} in" in summary
    assert "(bad_tag 1, key_not_allowed 1, malformed 1)" in summary
    assert "KMS calls" in summary
    kit.assert_dead_letters_by_source(await kit.read(bootstrap, dlq), produced, metadata, source)

    rewrapped = await kit.read(bootstrap, dest)
    assert len(rewrapped) == RECORDS + 2
    by_key = {r.key: r for r in rewrapped}
    for record in rewrapped:  # key, timestamp, headers and context are kept
        before = originals[record.key]
        assert record.timestamp == before.timestamp
        assert opened_headers(record.headers) == opened_headers(before.headers)  # envpipe.v aside
        if record.value is None:
            assert before.value is None
            continue
        assert record.headers[-1] == VERSION_HEADER
        header, _ = decode_header(record.value)
        assert header.kms_key_id == new_key
        assert header.encryption_context == decode_header(before.value)[0].encryption_context
    assert by_key[b"gone"].value is None

    async with kit.moto(dev_env) as (kms, _):
        reader = Decryptor(kms, allowed_kms_keys=[new_key], allowed_signing_keys=[signing])
        sealed = [r for r in rewrapped if r.value is not None]
        opened = await reader.open_many([(r.value, r.key) for r in sealed])
    assert Counter(opened) == Counter(r.value for r in plain)

    inspect = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "workers.cli", "inspect", "--topic", dest, "--json"),
        *("--limit", str(RECORDS + 10)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=workers.environ(ENVPIPE_ALLOWED_KMS_KEYS=new_key),
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(inspect.communicate(), 120)
    assert inspect.returncode == 0, err.decode()[-2000:]
    findings = [json.loads(line) for line in out.splitlines()]
    assert len(findings) == len(rewrapped)
    assert not [f for f in findings if f["header"] and f["header"]["kms_key_id"] == old_key]
    assert Counter(f["verdict"] for f in findings) == {"verified": RECORDS, "tombstone": 2}
    assert signing in {f["header"]["signing_key_id"] for f in findings if f["header"]}
