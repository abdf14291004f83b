"""Video ingest on Ray Data: manifests and label files, Kinetics-710 assembly and importers, segment-sampled
clip decoding with bad-video accounting (`pipeline.build_clip_dataset`), the synthetic motion sample dataset,
and the `python -m workflows data` tools (check, transcode, k710, sample, import)."""
