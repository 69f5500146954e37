"""Every file in cluster/ parses, pins Ray 2.60, installs the project's gpu extra and names real entrypoints."""

import re

import pytest
import yaml
from conftest import ROOT

from mindprint_ray.spec.run_spec import find_secret_keys

CLUSTER = ROOT / "cluster"
LAUNCHERS = {"aws-8xh100.yaml": "p5.48xlarge", "aws-4xa100.yaml": "p4de.24xlarge"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def named_configs(text: str) -> list[str]:
    return re.findall(r"python -m mindprint_ray (?:train|preflight|sweep) (configs/\S+\.yaml)", text)


@pytest.mark.parametrize("name,instance", LAUNCHERS.items())
def test_cluster_launcher_yaml(name, instance):
    c = load(name)
    assert c["provider"]["type"] == "aws" and c["cluster_name"]
    assert c["docker"]["image"].startswith("rayproject/ray:2.60.") and "ray-ml" not in c["docker"]["image"]
    nodes = c["available_node_types"]
    assert c["head_node_type"] in nodes
    head = nodes[c["head_node_type"]]
    workers = [n for k, n in nodes.items() if k != c["head_node_type"]]
    assert any(w["node_config"]["InstanceType"] == instance and w["resources"]["GPU"] == 8 for w in workers)
    assert all(w["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for w in workers)
    assert "InstanceMarketOptions" not in head["node_config"]  # the head stays on demand
    assert any("[gpu]" in cmd and "constraints.txt" in cmd for cmd in c["setup_commands"])
    assert any("ray start --head" in cmd for cmd in c["head_start_ray_commands"])
    assert find_secret_keys(c) is None
    text = (CLUSTER / name).read_text()
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_MODE=disabled" not in text
    for cfg in named_configs(text):
        assert (ROOT / cfg).is_file(), cfg


def test_kuberay_rayjob():
    job = load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    entry = job["spec"]["entrypoint"]
    cfgs = named_configs(entry)
    assert cfgs and all((ROOT / c).is_file() for c in cfgs)
    assert (ROOT / "mindprint_ray" / "__main__.py").is_file()
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert int(workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 8
    assert find_secret_keys(job) is None
    docker = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60." in docker and ".[gpu]" in docker


def test_runtime_env():
    env = load("runtime_env.yaml")
    excludes = env["excludes"]
    for path in (".venv", ".git", "/runs", "/models"):
        assert path in excludes
    assert "configs" not in excludes and "models" not in excludes  # configs/models/ must travel
    assert find_secret_keys(env) is None
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert set(env) <= {"excludes", "env_vars", "working_dir", "pip", "py_modules"}


def test_readme_shows_the_submit_flow():
    readme = (ROOT / "README.md").read_text()
    assert "ray job submit --address" in readme and "--runtime-env cluster/runtime_env.yaml" in readme
    assert "RAY_AUTH_MODE=token" in readme and "ray get-auth-token" in readme
    for cfg in named_configs(readme):
        assert (ROOT / cfg).is_file(), cfg
