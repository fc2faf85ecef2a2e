"""clusters/ and docker/: every file parses, has the keys its tool needs, and every ``idl-ray`` command
written in them (and in README.md and docs/) is one the CLI's own parser accepts with settings that validate."""

from __future__ import annotations

import pathlib
import re
import shlex
import sys

import pytest
import ray
import yaml

from idl_ray.cli import _jobs, build_parser, options_from_args

REPO = pathlib.Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
DOCKERFILE = REPO / "docker" / "Dockerfile"
IMAGE = "your-registry/idl-ray:latest"
PYTHON_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def dig(document: dict, *keys):
    for key in keys:
        assert isinstance(document, (dict, list)), f"expected a mapping/list above {key!r}"
        document = document[key]
    return document


def test_every_yaml_file_parses_and_is_known() -> None:
    names = sorted(p.name for p in CLUSTERS.glob("*.yaml"))
    assert names == ["aws-gpu.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "local.yaml"]
    for name in names:
        assert isinstance(load(name), dict), name


def test_cluster_launcher_config() -> None:
    config = load("aws-gpu.yaml")
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type"):
        assert key in config, key
    assert config["provider"]["type"] and config["provider"]["region"]
    assert config["head_node_type"] in config["available_node_types"]
    for node in config["available_node_types"].values():
        assert "node_config" in node and "resources" in node
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])


def _containers(pod_template: dict) -> list[dict]:
    return dig(pod_template, "template", "spec", "containers")


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests(name) -> None:
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert (
        manifest["kind"] == {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}[name]
    )
    assert manifest["metadata"]["name"]
    cluster = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    # the cluster must run the Ray version the package is tested with
    assert cluster["rayVersion"] == ray.__version__
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert "rayStartParams" in group
        for container in _containers(group):
            assert container["name"] and container["image"] == IMAGE  # the image docker/Dockerfile builds
    for worker in cluster["workerGroupSpecs"]:
        assert worker["groupName"] and worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    if manifest["kind"] == "RayJob":
        assert manifest["spec"]["entrypoint"].startswith("idl-ray ")


# ---------------------------------------------------------------- every idl-ray command in clusters/ and docker/
_COMMAND = re.compile(r"(?:idl-ray|python -m idl_ray)[ \t]+(?P<args>-{0,2}[a-z][^`'\"\n]*)")


def _code_blocks(markdown: str) -> str:
    """The fenced code blocks of a Markdown page (prose mentions such as `idl-ray sim --data` are not commands)."""
    return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL))


def documented_commands() -> list[tuple[str, str]]:
    """(file, argument string) for each ``idl-ray ...`` / ``python -m idl_ray ...`` written in the files:
    everything in clusters/ and the Dockerfile, the code blocks of README.md and docs/."""
    found = []
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for path in [*sorted(CLUSTERS.iterdir()), DOCKERFILE, *docs]:
        text = path.read_text()
        if path in docs:
            text = _code_blocks(text)
        text = text.replace("\\\n", " ")
        for match in _COMMAND.finditer(text):
            args = match.group("args").split(" #")[0].strip()
            found.append((path.name, args))
    return found


def test_commands_are_found() -> None:
    files = {name for name, _ in documented_commands()}
    assert {"kuberay-rayjob.yaml", "README.md", "aws-gpu.yaml"} <= files


@pytest.mark.parametrize(("source", "args"), documented_commands())
def test_documented_command_is_accepted_by_the_parser(source, args) -> None:
    argv = shlex.split(args)
    try:
        parsed = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help and --version exit 0
        if exit_.code == 0:
            return
        pytest.fail(f"{source}: `idl-ray {args}` is rejected by the CLI parser (exit {exit_.code})")
    if parsed.command in _jobs():
        import importlib

        module, config_name, _ = _jobs()[parsed.command]
        config_class = getattr(importlib.import_module(module), config_name)
        if getattr(parsed, "config", None):
            if not (REPO / parsed.config).is_file():
                return  # a run's own config.yaml: parsed above, its content is the user's
            parsed.config = str(REPO / parsed.config)
        options_from_args(config_class, parsed)  # raises ConfigError on a bad value


def test_dockerfile_base_image_is_the_installed_ray() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.MULTILINE))
    assert args["RAY_VERSION"] == ray.__version__
    assert args["PYTHON"] == PYTHON_TAG  # the cluster's Python must be the clients' Python for Ray
    assert args["VARIANT"] in ("cpu", "gpu")
    base = re.search(r"^FROM (\S+)$", text, flags=re.MULTILINE).group(1)
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}"
    # it installs this package (with the plot extra) from the build context
    assert re.search(r"COPY .*idl_ray \./idl_ray", text)
    assert re.search(r'pip install .*"\.\[plot\]"', text)


def test_manifests_and_docs_name_the_same_ray_version() -> None:
    text = "\n".join(p.read_text() for p in CLUSTERS.iterdir())
    versions = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
    assert versions <= {ray.__version__}, versions
