"""Side-by-side benchmarks: envpipe against the floor, its peers and a plain passthrough.

`envpipe bench` (see `benchmarks.run`) writes results.json, results.md and PNG plots. These
are programs that print figures; the test suite only runs them in a smoke mode and checks
the shape of the JSON, never a speed. One room per job:

    run, assemble, report*      the command, results.json / details.json, results.md and plots
    crypto_stage, crypto_child, crypto_impls, peers/
                                seal/open in process: aead_only, floor, envpipe, the peers
    pipeline_stage, worker_run, pipeline_worker, load
                                the workers end to end; how one worker run is fed and measured
    codec_stage, envelopes      bytes at the broker per codec and format; envelope sizes
    provider_stage, provider_probe
                                aws, vault and pkcs11 side by side
    kafka_stage                 the pipeline stage on Apache Kafka
    kms_budget, sweep, memory*, inprocess, profile_worker
                                KMS calls per DEK, the batch/process grid, RSS under slow
                                services, the demo's in-process timing, py-spy on a drain
    rigs/                       fault and measuring rigs shared with the tests
"""
