"""Video ingest on Ray Data: manifests and label files, Kinetics-710 assembly and importers, segment-sampled
clip decoding (`pipeline.build_clip_dataset`) with bad-video accounting (`drops`) on the decode nodes the cluster
offers (`decode_nodes`), the dataset doctor (`doctor`), the synthetic motion sample dataset, and the
`python -m workflows data` tools (check, transcode, k710, sample, import, upload)."""
