"""Ray workflows around the DiST model: ingest, pre-training, evaluation, sweeps.

Everything that touches Ray, DeepSpeed or MLflow lives here; `dist_model/` stays plain PyTorch.
"""
