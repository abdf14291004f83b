"""Checks on everything under cluster/: launcher YAMLs, the runtime env for `ray job submit`, the KubeRay RayJob.

The launcher YAMLs go through the same two steps `ray up` runs before it touches a cloud: Ray's
`prepare_config` (merge the provider's defaults, merge setup commands, fill per-node-type worker bounds) and
`validate_config` (the JSON schema shipped with Ray, `additionalProperties: false` throughout), so a misspelled
key fails here instead of at launch. Nothing here contacts a cloud or starts Ray; the file runs in about a second.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray._private.label_utils import parse_node_labels_string, validate_node_label_syntax
from ray._private.runtime_env.packaging import _get_excludes
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = ("aws.yaml", "gcp.yaml", "local.yaml")
CLOUD_YAMLS = ("aws.yaml", "gcp.yaml")
ROLE_KEY = "dist-role"


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def _prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` validates: the config with the provider's defaults filled in (no cloud calls)."""
    return prepare_config(copy.deepcopy(config))


def _ray_start_commands(config: dict[str, Any]) -> list[str]:
    cmds = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [c for c in cmds if "ray start" in c]


# ---------------------------------------------------------------------------------------------------------------
# Launcher YAMLs


def test_every_launcher_yaml_is_checked():
    """A new launcher YAML in cluster/ must be added to LAUNCHER_YAMLS, or it would escape validation."""
    found = {p.name for p in CLUSTER.glob("*.yaml") if "provider" in (yaml.safe_load(p.read_text()) or {})}
    assert found == set(LAUNCHER_YAMLS)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_ray_schema(name):
    config = _prepared(_load(name))
    validate_config(config)  # raises jsonschema.ValidationError / ValueError on any problem
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize(
    ("name", "path", "typo"),
    [
        ("aws.yaml", (), ("idle_timeout_minutes", "idle_timeout_minute")),
        ("aws.yaml", ("available_node_types", "gpu_a100"), ("min_workers", "min_worker")),
        ("gcp.yaml", ("available_node_types", "cpu_decode"), ("labels", "label")),
        ("local.yaml", (), ("head_start_ray_commands", "head_start_commands")),
    ],
    ids=["aws-top-level", "aws-node-type", "gcp-node-type-labels", "local-top-level"],
)
def test_misspelled_key_is_rejected(name, path, typo):
    """Proof that the validation above can fail: one renamed key makes Ray's own checks raise."""
    config = _load(name)
    section = config
    for key in path:
        section = section[key]
    right, wrong = typo
    section[wrong] = section.pop(right)
    with pytest.raises(jsonschema.ValidationError, match=wrong):
        validate_config(_prepared(config))


def test_ray_schema_knows_node_labels():
    """Node-type `labels` are part of the 2.60 launcher schema, so they are validated, not ignored."""
    config = _load("aws.yaml")
    config["available_node_types"]["cpu_decode"]["labels"] = {ROLE_KEY: 7}  # labels must be strings
    with pytest.raises(jsonschema.ValidationError):
        validate_config(_prepared(config))


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_head_runs_no_training(name):
    config = _prepared(_load(name))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise no CPUs so no worker lands there"
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_worker_node_types_carry_role_labels(name):
    config = _prepared(_load(name))
    roles = {}
    for type_name, node_type in config["available_node_types"].items():
        labels = node_type.get("labels", {})
        validate_node_label_syntax(labels)
        if type_name == config["head_node_type"]:
            continue
        expected = "train" if node_type["resources"].get("GPU", 0) > 0 else "decode"
        assert labels.get(ROLE_KEY) == expected, f"{type_name}: GPU nodes are {ROLE_KEY}=train, CPU-only =decode"
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
        roles[type_name] = expected
    assert set(roles.values()) == {"train", "decode"}


def test_local_yaml_sets_roles_in_start_commands():
    """The local provider forbids node types, so roles are `ray start` flags: checked with Ray's label parser."""
    config = _prepared(_load("local.yaml"))
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--num-cpus=0" in shlex.split(head_start)
    worker_start = next(c for c in config["worker_start_ray_commands"] if "ray start" in c)
    for role in ("train", "decode"):
        flags = shlex.split(worker_start.replace("$ROLE", role))
        labels_flag = next(f for f in flags if f.startswith("--labels="))
        assert parse_node_labels_string(labels_flag.removeprefix("--labels=")) == {ROLE_KEY: role}
    assert "ROLE=train" in worker_start and "ROLE=decode" in worker_start


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_every_node_holds_and_enforces_the_token(name):
    config = _prepared(_load(name))
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    starts = _ray_start_commands(config)
    assert len(starts) == 2
    for cmd in starts:
        assert "RAY_AUTH_MODE=token ray start" in cmd
    # `ray up` itself warns when the head is started without the autoscaler config it uploads.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in starts[0]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_nodes_install_the_pinned_requirements(name):
    config = _prepared(_load(name))
    assert config["file_mounts"]["~/dist/requirements.txt"] == "./requirements.txt"
    assert (REPO / "requirements.txt").is_file()
    assert any("-r ~/dist/requirements.txt" in c for c in config["setup_commands"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_node_commands_are_valid_bash(name):
    """Folded YAML strings are easy to break; `bash -n` parses every command the launcher will run (no execution)."""
    config = _prepared(_load(name))
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip
    for key in keys:
        for cmd in config[key]:
            result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert result.returncode == 0, f"{key}: {cmd!r}: {result.stderr}"


def test_requirements_pin_the_ray_that_validates_the_cluster():
    """Laptop, nodes, image and RayJob must all run the same Ray; the pin is the single source."""
    pins = re.findall(r"^ray\[[^\]]*\]==(\S+)", (REPO / "requirements.txt").read_text(), flags=re.M)
    assert pins == [ray.__version__]
    assert f"FROM rayproject/ray:{ray.__version__}-" in (CLUSTER / "Dockerfile").read_text()
    assert _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_head_serves_mlflow_to_every_node(name):
    config = _prepared(_load(name))
    mlflow = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(mlflow) == 1 and "--port 5000" in mlflow[0]
    for cmd in _ray_start_commands(config):
        assert "MLFLOW_TRACKING_URI=" in cmd


# ---------------------------------------------------------------------------------------------------------------
# Runtime env for `ray job submit --runtime-env cluster/runtime_env.yaml --working-dir .`


def _submitted_runtime_env() -> dict[str, Any]:
    """The dict `ray job submit` builds from the file and --working-dir (Ray's own parser)."""
    return parse_runtime_env_args(runtime_env=str(CLUSTER / "runtime_env.yaml"), working_dir=".")


def test_runtime_env_is_accepted_by_ray():
    env = _submitted_runtime_env()
    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"unknown runtime_env keys (Ray would treat them as plugins): {unknown}"
    RuntimeEnv(**env)  # Ray's own validation of each field
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert int(env["env_vars"]["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 300


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        (".venv", True),
        (".venv/lib/python3.11/site-packages/torch/__init__.py", True),
        (".git/HEAD", True),
        (".venv-gpu/lib/python3.12/site-packages/torch/__init__.py", True),
        (".gpu/whl/open_clip_torch-3.3.0-py3-none-any.whl", True),
        (".gpu/site.tar.xz", True),
        ("data", True),
        ("data/k710/train/abc.mp4", True),
        ("runs/k710_b16/checkpoint_000001/model.pt", True),
        ("mlruns", True),
        ("mlflow.db", True),
        ("tests/assets/clip.mp4", True),
        ("dist_model/__pycache__/model.cpython-311.pyc", True),
        ("wheels/ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl", True),  # packages come from the nodes' venv
        ("bundle/site-packages.tar.xz", True),
        ("workflows/data/__init__.py", False),
        ("workflows/configs/k710_b16_8x16f.yaml", False),
        ("dist_model/model.py", False),
        ("cluster/runtime_env.yaml", False),
        ("requirements.txt", False),
    ],
)
def test_runtime_env_excludes(path, excluded):
    """Ray's own matcher: heavy and private paths stay home, every package (workflows/data too) is uploaded."""
    matches = _get_excludes(REPO, _submitted_runtime_env()["excludes"])
    assert matches(REPO / path) is excluded


# ---------------------------------------------------------------------------------------------------------------
# KubeRay RayJob

# Fields of the KubeRay v1 API (RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec) as of v1.5.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_FIELDS = {
    "template", "headService", "enableIngress", "resources", "labels", "rayStartParams", "serviceType",
}  # fmt: skip
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "resources",
    "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _load("kuberay-rayjob.yaml")


def test_rayjob_uses_only_known_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, group["groupName"]


def test_rayjob_runs_the_k710_pretrain_recipe(rayjob):
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "workflows", "pretrain"]
    config_path = argv[argv.index("--config") + 1]
    assert config_path == "workflows/configs/k710_b16_8x16f.yaml" and (REPO / config_path).is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)
    assert set(env) <= RuntimeEnv.known_fields
    assert "MLFLOW_TRACKING_URI" in env["env_vars"]


def test_rayjob_cluster_shape(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    images = {c["image"] for c in head["template"]["spec"]["containers"]}
    roles = {}
    for group in cluster["workerGroupSpecs"]:
        validate_node_label_syntax(group["labels"])
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        images.add(container["image"])
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        roles[group["groupName"]] = group["labels"][ROLE_KEY]
        assert group["labels"][ROLE_KEY] == ("train" if gpus else "decode")
    assert sorted(roles.values()) == ["decode", "train"]
    assert len(images) == 1, "head and workers must run the same image"


# ---------------------------------------------------------------------------------------------------------------
# README


def test_readme_names_only_real_files():
    text = (CLUSTER / "README.md").read_text()
    recipes, cluster_files = (set(re.findall(pattern, text)) for pattern in
                              (r"workflows/configs/[\w.-]+\.yaml", r"cluster/[\w.-]+"))
    assert len(recipes) >= 5 and len(cluster_files) >= 5  # the patterns still match how the README names files
    for path in recipes | cluster_files:
        assert (REPO / path).is_file(), path


def test_gce_scheduling_is_a_mapping_and_a_preemptible_vm_does_not_restart():
    """GCE's instances.insert takes `scheduling` as an object; Ray's GCP provider passes node_config through
    unchanged and its schema does not look inside, so a list (Ray's own examples' form) fails only at instance
    creation. A preemptible VM must also say automaticRestart false and onHostMaintenance TERMINATE."""
    config = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    for name, node_type in config["available_node_types"].items():
        scheduling = node_type["node_config"].get("scheduling")
        if scheduling is None:
            continue
        assert isinstance(scheduling, dict), name
        if scheduling.get("preemptible"):
            assert scheduling.get("automaticRestart") is False and scheduling.get("onHostMaintenance") == "TERMINATE"


def test_the_kuberay_job_and_the_launcher_headers_name_the_recipes_run_prefix_and_data_in_the_bucket():
    """The fine-tune recipes find the K710 run in <bucket>/dist-runs (their train.init_from): a K710 run submitted
    as the headers or the RayJob show must land there; and the shipped /data paths exist on no cloud node or pod."""
    import shlex

    entry = shlex.split(yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())["spec"]["entrypoint"])
    sets = dict(arg.split("=", 1) for arg in entry[entry.index("--set") + 1:])
    assert sets["run.storage_path"] == "s3://YOUR-BUCKET/dist-runs"
    assert {"data.train_manifest", "data.val_manifest", "data.labels"} <= set(sets)
    from_k710 = yaml.safe_load((REPO / "workflows/configs/k400_b16_8x16f_from_k710.yaml").read_text())
    assert from_k710["train"]["init_from"].startswith(sets["run.storage_path"] + "/")
    for name in CLOUD_YAMLS:
        header = (CLUSTER / name).read_text().split("\n\n", 1)[0]
        assert "YOUR-BUCKET/dist-runs" in header and "data.train_manifest=" in header and "dist/runs" not in header
