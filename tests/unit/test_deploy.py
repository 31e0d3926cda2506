"""deploy/ and the Dockerfile: the files parse, and every entrypoint they name exists (and,
for the GRPO loop, accepts the flags they pass)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MANIFESTS = sorted((DEPLOY / "kuberay").glob("*.yaml"))
SCANNED = [*MANIFESTS, DEPLOY / "runtime_env.yaml", DEPLOY / "submit.sh", REPO / "Dockerfile"]


def _load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    return doc


def _referenced_entrypoints() -> list[str]:
    """Files named by the deploy files: ``python -m pkg.mod`` and ``dir/file.py|sh`` paths."""
    found: set[str] = set()
    for path in SCANNED:
        text = path.read_text()
        for mod in re.findall(r"python3? -m ((?:services|weightsync|benchmarks)\.[\w.]+)", text):
            found.add(mod.replace(".", "/") + ".py")
        found.update(re.findall(r"\b((?:services|deploy|weightsync)/[\w/]+\.(?:py|sh))\b", text))
    return sorted(found)


def _grpo_cli_accepts(args: list[str]) -> None:
    import typer

    from services.grpo import app

    typer.main.get_command(app).make_context("services.grpo", list(args))


def _module_args(command: list[str], module: str) -> list[str]:
    i = command.index("-m")
    assert command[i + 1] == module, command
    return command[i + 2:]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def test_entrypoints_are_found():
    refs = _referenced_entrypoints()
    assert {"services/grpo.py", "services/serve.py", "deploy/submit.sh"} <= set(refs), refs


@pytest.mark.parametrize("relpath", _referenced_entrypoints())
def test_named_entrypoint_exists(relpath):
    assert (REPO / relpath).is_file(), f"{relpath} is named in deploy/ or the Dockerfile"


def test_runtime_env_excludes_heavy_paths_and_sets_string_env():
    env = _load(DEPLOY / "runtime_env.yaml")
    assert {".venv/", ".whl/", "runs/", ".git/"} <= set(env["excludes"])
    assert "working_dir" not in env  # given by submit.sh (--working-dir .)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env["env_vars"].items())


def test_submit_script_wraps_ray_job_submit():
    script = DEPLOY / "submit.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert re.search(r"job submit .*--working-dir \.", text)
    assert "--runtime-env deploy/runtime_env.yaml" in text
    assert "${WEIGHTSYNC_ENTRYPOINT:-services.grpo}" in text


def test_submit_script_requires_an_address():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([str(DEPLOY / "submit.sh")], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "RAY_ADDRESS" in out.stderr


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_has_gpu_workers_and_the_service_ports(path):
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = _cluster_spec(doc)
    head = _containers(spec["headGroupSpec"]["template"])[0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["weightsync"] == 8765 and ports["dashboard"] == 8265
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        for c in _containers(group["template"]):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert c["image"] == head["image"]


def test_raycluster_names_the_control_plane_and_secures_it():
    doc = _load(DEPLOY / "kuberay" / "raycluster.yaml")
    assert doc["metadata"]["annotations"]["weightsync.io/control-plane"] == "services/serve.py"
    head = _containers(doc["spec"]["headGroupSpec"]["template"])[0]
    env = {e["name"]: e for e in head["env"]}
    assert env["WEIGHTSYNC_PORT"]["value"] == "8765"
    # serve refuses a non-loopback bind without a token: it must come from a Secret
    assert env["WEIGHTSYNC_HOST"]["value"] == "0.0.0.0"
    assert "secretKeyRef" in env["WEIGHTSYNC_TOKEN"]["valueFrom"]


def test_rayjob_entrypoint_is_the_grpo_loop_with_valid_flags():
    doc = _load(DEPLOY / "kuberay" / "rayjob.yaml")
    command = shlex.split(doc["spec"]["entrypoint"])
    _grpo_cli_accepts(_module_args(command, "services.grpo"))
    assert doc["spec"]["entrypointNumGpus"] >= 1  # the trainer holds a GPU
    assert isinstance(yaml.safe_load(doc["spec"]["runtimeEnvYAML"]), dict)
    # the job's rollout router is exposed on the head's weightsync port, with a token from a
    # Secret (a non-loopback router refuses to start without one)
    args = _module_args(command, "services.grpo")
    router = {a: args[args.index(a) + 1] for a in ("--rollout", "--router-host", "--router-port")}
    assert router == {"--rollout": "openai", "--router-host": "0.0.0.0", "--router-port": "8765"}
    head = _containers(doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])[0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["weightsync"] == 8765
    assert "secretKeyRef" in {e["name"]: e for e in head["env"]}["WEIGHTSYNC_TOKEN"]["valueFrom"]


def test_dockerfile_entrypoint_and_sources_exist():
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("FROM ")
    cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD "))[4:])
    _grpo_cli_accepts(_module_args(cmd, "services.grpo"))
    for ln in lines:
        if ln.startswith("COPY "):
            for src in shlex.split(ln)[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    assert 'EXPOSE' in " ".join(lines) and "8765" in next(ln for ln in lines if ln.startswith("EXPOSE"))
