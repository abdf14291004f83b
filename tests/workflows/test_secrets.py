"""Credentials given inside URIs never reach files, logs or MLflow (#21)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from workflows.config_loader import dump_yaml
from workflows.console import recipe_summary
from workflows.recipe import load_recipe
from workflows.runtime import redact_secrets
from workflows.tracking import Tracker

SMOKE = Path(__file__).parents[2] / "workflows" / "configs" / "smoke.yaml"
SECRETS = ("AKIAEXAMPLE", "wJalrXUtnFEMI", "hunter2", "FwoGZXIvYXdz")


def test_uri_credentials_are_redacted_and_the_rest_kept():
    uri = ("s3://runs/dist?access_key=AKIAEXAMPLE&secret_key=wJalrXUtnFEMI&session_token=FwoGZXIvYXdz"
           "&endpoint_override=127.0.0.1:9000&region=eu-west-1")
    clean = redact_secrets(uri)
    assert not any(secret in clean for secret in SECRETS)
    assert clean.startswith("s3://runs/dist?") and "endpoint_override=127.0.0.1:9000" in clean and "region=eu-west-1" \
        in clean
    assert redact_secrets("http://alice:hunter2@mlflow.internal:5000") == "http://alice:REDACTED@mlflow.internal:5000"
    assert redact_secrets("/data/train.csv") == "/data/train.csv"
    assert redact_secrets({"a": ["gs://b/c", "http://u:hunter2@h"]}) == {"a": ["gs://b/c", "http://u:REDACTED@h"]}
    assert redact_secrets("s3://b/k?x=%2F&&token=abc#f") == "s3://b/k?x=%2F&&token=REDACTED#f"
    assert redact_secrets("postgresql://mlflow@db:5432/runs") == "postgresql://REDACTED@db:5432/runs"


def test_uris_without_credentials_are_written_as_they_are():
    """The run's own sqlite store (an absolute path after sqlite:///) came back from urlunsplit as
    sqlite://abs/... in every recipe.yaml and MLflow param, naming another store."""
    for uri in ("sqlite:////work/runs/demo/mlflow.db", "sqlite:///mlflow.db", "file:///data/a%20b.csv",
                "mlflow-artifacts:/0/abc", "s3://bucket/prefix?region=eu-west-1&endpoint_override=h%3A9000",
                "http://mlflow.internal:5000/"):
        assert redact_secrets(uri) == uri


def test_a_recipe_with_credentials_in_its_uris_writes_none_of_them(tmp_path):
    recipe = load_recipe(SMOKE, [
        "run.storage_path=s3://runs/dist?access_key=AKIAEXAMPLE&secret_key=wJalrXUtnFEMI",
        "mlflow.tracking_uri=http://alice:hunter2@mlflow.internal:5000",
        "train.init_from=s3://ckpt/run?session_token=FwoGZXIvYXdz"], check_files=False)
    assert recipe.run.storage_path.endswith("secret_key=wJalrXUtnFEMI")  # the run itself still has them
    written = dump_yaml(recipe) + recipe_summary(recipe)  # saved recipe.yaml files, MLflow's recipe.yaml, console
    assert not any(secret in written for secret in SECRETS)
    assert "mlflow.internal:5000" in written

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, experiment="exp", run_name="r")
    from workflows.recipe import recipe_to_dict

    tracker.log_params(recipe_to_dict(recipe))
    tracker.finish()
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        values = " ".join(v for (v,) in con.execute("select value from params"))
    assert values and not any(secret in values for secret in SECRETS)


def test_a_recipe_writes_its_sqlite_store_as_given(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # an absolute path: sqlite:////tmp/...
    recipe = load_recipe(SMOKE, [f"mlflow.tracking_uri={uri}"], check_files=False)
    assert f"tracking_uri: {uri}\n" in dump_yaml(recipe) and f"mlflow.tracking_uri={uri}" in recipe_summary(recipe)


def test_the_mangled_sqlite_forms_of_older_recipes_are_repaired():
    from workflows.tracking import repaired_sqlite_uri

    assert repaired_sqlite_uri("sqlite://work/runs/mlflow.db") == "sqlite:////work/runs/mlflow.db"
    assert repaired_sqlite_uri("sqlite:/mlflow.db") == "sqlite:///mlflow.db"
    for uri in ("sqlite:////work/runs/mlflow.db", "sqlite:///mlflow.db", "sqlite://", "http://h:5000", None):
        assert repaired_sqlite_uri(uri) == uri
