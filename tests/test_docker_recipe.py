"""docker/: what can be checked without a Docker engine. The compose file parses and is the seed's deployment
(port 23333, 4 GPUs reserved, ipc host, the HF token from the environment, never written down); its command is a
``hub_cli serve`` line whose ``--dry-run`` on a 4-GPU machine prints the vLLM command the seed's flags mean; the
Dockerfile builds on the vLLM image of the version pyproject pins and installs the project as the README says."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30
# InternVL2-26B's shapes (InternViT-6B + InternLM2-20B), as its config.json has them
CONFIG_26B = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
    "max_dynamic_patch": 12,
    "llm_config": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 6144,
                   "intermediate_size": 16384, "num_hidden_layers": 48, "num_attention_heads": 48,
                   "num_key_value_heads": 8, "vocab_size": 92553, "max_position_embeddings": 32768,
                   "tie_word_embeddings": False},
    "vision_config": {"hidden_size": 3200, "intermediate_size": 12800, "num_hidden_layers": 45, "image_size": 448,
                      "patch_size": 14, "norm_type": "rms_norm", "qkv_bias": False, "qk_normalization": True},
}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def service(compose):
    assert list(compose["services"]) == ["internvl"]
    return compose["services"]["internvl"]


def test_compose_is_the_seed_deployment(service):
    assert service["ports"] == ["127.0.0.1:23333:23333"]   # the seed's port, published on the host's loopback
    assert service["ipc"] == "host"
    assert service["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 4, "capabilities": ["gpu"]}]
    assert service["environment"] == {"HF_TOKEN": "${HF_TOKEN:-}"}   # taken from the caller's environment
    assert service["volumes"] == ["~/.cache/vllm-internvl:/root/.cache/vllm-internvl"]
    assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert not re.search(r"hf_[A-Za-z0-9]{8,}", (ROOT / "docker" / "compose.yaml").read_text())


def test_compose_command_is_what_hub_cli_serve_runs(service, tmp_path, monkeypatch):
    import hub_cli.launch
    import hub_cli.serve
    from hub_cli.cli import main
    from internvl_plugin.memory import estimate_from_config

    command = service["command"]
    assert command[:2] == ["serve", "OpenGVLab/InternVL2-26B"]   # the image's entrypoint is hub_cli
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags == {"--tp": "4", "--cache-max-entry-count": "0.5", "--server-name": "0.0.0.0",
                     "--server-port": "23333"}

    # what the container does at start-up, here: a 4-GPU CUDA machine of 80 GiB GPUs with 79 GiB free, the repo
    # already in the mounted cache (resolve_model would fetch it)
    folder = tmp_path / "InternVL2-26B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG_26B))
    monkeypatch.setattr(hub_cli.launch, "is_cpu_vllm", lambda: False)
    memory = hub_cli.serve.MemoryInfo(free_bytes=79 * GiB, total_bytes=80 * GiB, device="cuda")
    monkeypatch.setattr(hub_cli.serve, "probe_memory", lambda on_cpu, tp=1: memory)
    monkeypatch.setattr(hub_cli.serve, "resolve_model", lambda repo, **kw: hub_cli.serve.ResolvedModel(
        path=folder, repo=repo, served_name=repo))
    result = CliRunner().invoke(main, [*command, "--dry-run"])
    assert result.exit_code == 0, result.output
    printed = result.stdout.strip().splitlines()[-1]

    weights = estimate_from_config(CONFIG_26B).total_bytes / 4                  # per GPU
    util = (weights + 0.5 * (79 * GiB - weights) + 1.5 * GiB) / (80 * GiB)      # LMDeploy's KV share, README formula
    assert 0.5 < util < 0.95
    words = shlex.split(printed)
    # serve sizes the image limit to the session itself (as many config-sized images as fit, 1..16)
    limit = words[words.index("--limit-mm-per-prompt") + 1]
    assert 1 <= json.loads(limit)["image"] <= 16
    assert words == [
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "0.0.0.0",
        "--port", "23333", "--served-model-name", "OpenGVLab/InternVL2-26B", "--tensor-parallel-size", "4",
        "--gpu-memory-utilization", f"{util:.3f}", "--limit-mm-per-prompt", limit,
        "--middleware", hub_cli.serve.MEDIA_MIDDLEWARE, "--allowed-media-domains", hub_cli.serve.NO_VLLM_FETCH_DOMAIN]


def test_dockerfile_is_the_pinned_vllm_image_with_the_readme_install():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'cuda = \["vllm==([0-9.]+)"\]', pyproject).group(1)
    assert instructions[0] == f"FROM vllm/vllm-openai:v{pinned}" and pinned.startswith("0.32")
    run = [line for line in instructions if line.startswith("RUN ")]
    assert run == ['RUN pip install ".[cuda]"']
    assert '`pip install ".[cuda]"`' in (ROOT / "README.md").read_text()   # the README's by-hand install
    assert 'ENTRYPOINT ["hub_cli"]' in instructions
    # everything the wheel holds is copied in (pyproject's packages)
    packages = re.search(r"packages = \[([^\]]*)\]", pyproject).group(1)
    top = {p.strip().strip('"').split(".")[0] for p in packages.split(",")} - {"internvl_kernels"} | {"kernels"}
    copied = {line.split()[1] for line in instructions if line.startswith("COPY ")}
    assert top <= copied
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert all(f"!{name}/" in ignore for name in top)
