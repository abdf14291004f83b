"""Ray Tune sweeps over DiST's fusion choices (`python -m workflows tune --config SWEEP.yaml`), in three modules:

- `sweep_config`: the sweep file's schema and search space, loading with `--set`, and every check done before Ray
  starts (`load_sweep`, `plan_sweep` -> `SweepPlan`);
- `driver`: sizing trials against the cluster, the trial (the pre-training driver under Tune), `run_sweep` and the
  CLI `main`;
- `report`: what a finished sweep produced (`summarize_sweep`): the results table, the accuracy-vs-cost plot with
  its Pareto front, and their MLflow record.

Names are imported from the module that defines them; this package re-exports nothing.
"""
