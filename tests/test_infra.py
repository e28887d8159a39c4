"""Deployment files parse and keep large local state out of uploads."""

from __future__ import annotations

import yaml


def test_runtime_env_excludes_local_state(repo):
    env = yaml.safe_load((repo / "infra" / "runtime-env.yaml").read_text())
    assert env["working_dir"] == "."
    excludes = set(env["excludes"])
    for path in (".venv/", ".git/", "data/", ".dvc/cache/"):
        assert path in excludes, path
    # everything git ignores as generated data must not be uploaded either
    ignored = {line.strip().lstrip("/") for line in (repo / ".gitignore").read_text().splitlines()}
    for path in ("data/", "dvclive/", ".venv/"):
        assert path in ignored


def _pinned(repo, package: str) -> str:
    import re

    found = re.search(rf"^{package}==(\S+)$", (repo / "constraints.txt").read_text(), re.M)
    assert found, f"{package} is not pinned in constraints.txt"
    return found.group(1)


def _image_ray_version(image: str) -> str:
    # rayproject/ray:2.60.0-py311-gpu -> 2.60.0
    assert image.startswith("rayproject/ray:"), image
    return image.split(":", 1)[1].split("-")[0]


def _entrypoint_ok(repo, entrypoint: str) -> None:
    """``python -m pipelines.X --flag ...``: the module exists and accepts the flags."""
    words = entrypoint.split()
    assert words[:2] == ["python", "-m"], entrypoint
    module = repo / (words[2].replace(".", "/") + ".py")
    assert module.is_file(), f"{words[2]} does not exist"
    # its own --help lists every flag the entrypoint passes
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", words[2], "--help"], cwd=repo, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    for flag in (w for w in words[3:] if w.startswith("--")):
        assert flag in shown.stdout.split(), f"{words[2]} has no {flag} option"


def test_cluster_launcher_config(repo):
    cfg = yaml.safe_load((repo / "infra" / "cluster-aws.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):  # fmt: skip
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert any(v["max_workers"] > 0 and v["node_config"]["InstanceType"][0] in "gp" for v in workers.values())
    assert sum(v["max_workers"] for v in workers.values()) <= cfg["max_workers"]
    assert _image_ray_version(cfg["docker"]["image"]) == _pinned(repo, "ray")
    assert "-py311" in cfg["docker"]["image"]  # the Python the package is pinned and tested on
    assert any("constraints.txt" in c and "pip install" in c for c in cfg["setup_commands"])
    assert "." in cfg["file_mounts"].values()


def test_kuberay_jobs(repo):
    jobs = sorted((repo / "infra" / "kuberay").glob("rayjob-*.yaml"))
    assert [p.stem for p in jobs] == ["rayjob-invert", "rayjob-train"]
    dockerfile = (repo / "infra" / "Dockerfile").read_text()
    base = next(line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert _image_ray_version(base) == _pinned(repo, "ray")
    for path in jobs:
        job = yaml.safe_load(path.read_text())
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob", path
        spec = job["spec"]
        _entrypoint_ok(repo, spec["entrypoint"])
        assert spec["shutdownAfterJobFinishes"] is True
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == _pinned(repo, "ray")
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        workers = [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
        assert workers and all(w["image"] == head["image"] for w in workers)
        assert any("nvidia.com/gpu" in w["resources"]["limits"] for w in workers)
        for group in cluster["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_minio_compose_is_local_and_keeps_credentials_out(repo):
    compose = yaml.safe_load((repo / "infra" / "minio-compose.yaml").read_text())
    minio = compose["services"]["minio"]
    assert all(str(p).startswith("127.0.0.1:") for p in minio["ports"])  # loopback only
    for service in compose["services"].values():
        for name, value in service.get("environment", {}).items():
            assert str(value).startswith("${") and ":?" in str(value), (
                f"{name} must come from the environment"
            )
    assert "mb" in compose["services"]["create-bucket"]["entrypoint"]


def test_no_credentials_in_deployment_files(repo):
    import re

    files = [p for p in (repo / "infra").rglob("*") if p.is_file()] + [repo / "params.yaml"]
    for path in files:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        secret = r"(?i)aws_secret_access_key\s*[:=]\s*(?!\$)\S{8,}"  # a literal value, not $VAR
        assert not re.search(secret, text), path
    # the Docker build context leaves local state out too
    ignored = (repo / ".dockerignore").read_text().split()
    for path in (".venv/", ".git/", "data/"):
        assert path in ignored


def test_gpu_nodes_get_the_triton_scan(repo):
    # The deployment installs with constraints.txt; its torch must be a CUDA build (which brings
    # Triton, pinned alongside) for GPU workers to run the `triton` backend instead of `ref`.
    assert "+cpu" not in _pinned(repo, "torch")
    assert _pinned(repo, "triton")
    docker = (repo / "infra" / "Dockerfile").read_text()
    assert "-c constraints.txt" in docker and "import torch, triton" in docker
    cfg = yaml.safe_load((repo / "infra" / "cluster-aws.yaml").read_text())
    assert any("constraints.txt" in cmd for cmd in cfg["setup_commands"])


def test_serve_config_and_rayservice_build_the_app_from_a_params_file_in_the_image(repo):
    import importlib

    config = yaml.safe_load((repo / "infra" / "serve.yaml").read_text())
    service = yaml.safe_load((repo / "infra" / "kuberay" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == _pinned(repo, "ray")
    for app in config["applications"] + yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        params = app["args"]["params"]
        # /app is the image's checkout (infra/Dockerfile); /config the ConfigMap of params.yaml
        assert params == "/config/params.yaml" or (repo / params.removeprefix("/app/")).is_file(), params
    assert '"[serve]"' in (repo / "infra" / "Dockerfile").read_text()  # the image can serve


def test_the_serve_configs_builder_makes_an_application_from_a_params_file(repo):
    from ray.serve.deployment import Application

    from mambastyle.serve.app import app_builder

    app = app_builder({"params": str(repo / "params.yaml")})  # binds only: no model is loaded
    assert isinstance(app, Application)
