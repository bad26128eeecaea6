"""Fault and measurement rigs the benchmarks and the tests share (never used in production).

kms_proxy     an HTTP-aware proxy in front of a KMS or Vault: refuse, stall, throttle,
              internal errors, AWS key-state errors, per-operation faults, a delay
kafka_proxy   a Kafka-frame-aware TCP proxy: counts the bytes of Produce requests and
              can pace them to a slow link
tls           a test CA and a TLS terminator in front of a plaintext broker
"""
