"""`confluent_csfle`: confluent-kafka-python's field-level encryption rule executor (Tink).

The record is an Avro record with one `bytes` field tagged PII; an ENCRYPT rule on the
subject (in a `mock://` schema registry, which also serves the DEK registry) encrypts that
field with Tink AES-256-GCM under a DEK wrapped by the AWS KMS driver. The driver is pointed
at the embedded KMS by registering a Tink AWS KMS client built on our own boto3 client (the
driver's built-in one would go to real AWS); KMS requests are counted on that client.
Seal = `AvroSerializer(...)(record)`, open = `AvroDeserializer(...)(bytes)`: the executor runs
inside the serializers, so that is the API its users call per record.
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks.crypto_impls import ImplContext
from benchmarks.peers.botocore_counting import CountedPeer

_SUBJECT_TOPIC = "bench"
_SCHEMA = {
    "type": "record",
    "name": "Payload",
    "namespace": "envpipe.bench",
    "fields": [{"name": "data", "type": "bytes", "confluent:tags": ["PII"]}],
}


class ConfluentCsfle(CountedPeer):
    """A serializer/deserializer pair with the ENCRYPT rule, on a mock registry."""

    note = (
        "AvroSerializer/AvroDeserializer with a FieldEncryptionExecutor ENCRYPT rule "
        "(AES256_GCM DEK via Tink, aws-kms KEK at the embedded KMS), mock:// registries"
    )

    def __init__(self, context: ImplContext) -> None:
        import boto3  # type: ignore[import-untyped]  # noqa: PLC0415 - optional peer
        import tink  # type: ignore[import-untyped]  # noqa: PLC0415
        from confluent_kafka.schema_registry import (  # noqa: PLC0415
            Rule,
            RuleKind,
            RuleMode,
            RuleParams,
            RuleSet,
            Schema,
            SchemaRegistryClient,
        )
        from confluent_kafka.schema_registry.avro import (  # noqa: PLC0415
            AvroDeserializer,
            AvroSerializer,
        )
        from confluent_kafka.schema_registry.rules.encryption.awskms.aws_driver import (  # noqa: PLC0415
            AwsKmsDriver,
        )
        from confluent_kafka.schema_registry.rules.encryption.encrypt_executor import (  # noqa: PLC0415
            FieldEncryptionExecutor,
        )
        from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: PLC0415
        from tink.integration import awskms  # type: ignore[import-untyped]  # noqa: PLC0415

        super().__init__()
        kms = boto3.Session(region_name=context.region).client(
            "kms", endpoint_url=context.kms_endpoint
        )
        kms.meta.events.register("before-call.kms", self._counter)
        key_uri = f"aws-kms://{context.kms_key_canonical}"
        tink.register_kms_client(awskms.new_client(boto3_client=kms, key_uri=key_uri))
        AwsKmsDriver.register()
        FieldEncryptionExecutor.register()  # type: ignore[no-untyped-call]

        registry = SchemaRegistryClient.new_client({"url": "mock://"})
        rule = Rule(
            "encrypt-pii",
            "",
            RuleKind.TRANSFORM,
            RuleMode.WRITEREAD,
            "ENCRYPT",
            ["PII"],
            RuleParams(
                {
                    "encrypt.kek.name": "envpipe-bench",
                    "encrypt.kms.type": "aws-kms",
                    "encrypt.kms.key.id": context.kms_key_canonical,
                }
            ),
            None,
            None,
            "ERROR,NONE",
            False,
        )
        registry.register_schema(
            f"{_SUBJECT_TOPIC}-value",
            Schema(json.dumps(_SCHEMA), "AVRO", [], None, RuleSet(None, [rule])),
        )
        self._serialize: Any = AvroSerializer(
            registry,
            schema_str=None,
            conf={"auto.register.schemas": False, "use.latest.version": True},
        )
        self._deserialize: Any = AvroDeserializer(registry)
        self._context = SerializationContext(_SUBJECT_TOPIC, MessageField.VALUE)

    def seal(self, value: bytes) -> bytes:
        return bytes(self._serialize({"data": value}, self._context))

    def open(self, blob: bytes) -> bytes:
        return bytes(self._deserialize(blob, self._context)["data"])


async def create(context: ImplContext) -> ConfluentCsfle:
    """The harness's factory."""
    return ConfluentCsfle(context)
