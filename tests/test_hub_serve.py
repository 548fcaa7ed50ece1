"""hub_cli serve / chat: LMDeploy flags -> vLLM arguments, MODEL_OR_REPO resolution (fetch from the fake hub),
one real server of a tiny InternVL started with ``hub_cli serve``, and ``hub_cli chat`` driven through a
pseudo-terminal against that same server."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import NETGUARD_SITECUSTOMIZE, cli_server, png_bytes
from fakehub import FakeHub

from hub_cli.cli import main
from hub_cli.errors import NotFoundError, UsageError
from internvl_plugin import cpu_dtype
from internvl_plugin.cpu_dtype import choose_cpu_dtype
from internvl_plugin.memory import GiB
from hub_cli.serve import (ACTIVATION_ALLOWANCE, COMPLETE_MARKER, MemoryInfo, build_vllm_args, plan_server,
                           resolve_model)

HUB_CLI = Path(sys.executable).with_name("hub_cli")

# InternVL2-2B's shapes (InternViT-300M + InternLM2-1.8B), so that the memory arithmetic has real sizes.
LLM_2B = {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
          "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 92553,
          "max_position_embeddings": 32768, "tie_word_embeddings": False}
CONFIG_2B = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
             "max_dynamic_patch": 12, "llm_config": LLM_2B,
             "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                               "image_size": 448, "patch_size": 14, "norm_type": "layer_norm", "qkv_bias": True}}
KV_PER_TOKEN_2B = 2 * 24 * 8 * 128 * 2     # bf16 K and V, 24 layers, 8 KV heads, head_dim 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(root: Path, config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


def _flags(args: list[str]) -> dict[str, str | bool]:
    """``--flag value`` / ``--flag`` pairs of a vLLM argument list (flags without a value map to True)."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        assert args[i].startswith("-"), args
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]] = args[i + 1]
            i += 2
        else:
            out[args[i]] = True
            i += 1
    return out


@pytest.fixture
def model_2b(tmp_path: Path) -> Path:
    return _model_dir(tmp_path / "InternVL2-2B", CONFIG_2B)


def _weights_2b() -> int:
    from internvl_plugin.memory import estimate_from_config

    return estimate_from_config(CONFIG_2B).total_bytes


# ---------------------------------------------------------------------------------------------------------
# build_vllm_args: the mapping, one row per flag
# ---------------------------------------------------------------------------------------------------------
MAPPING = [
    # (LMDeploy-style options, vLLM flags expected, vLLM flags that must be absent)
    ({}, {"--host": "127.0.0.1", "--port": "23333"},
     ["--tensor-parallel-size", "--kv-cache-dtype", "--gpu-memory-utilization", "--trust-request-mm-kwargs",
      "--served-model-name", "--max-model-len", "--max-num-seqs", "--enforce-eager", "--quantization"]),
    ({"server_name": "0.0.0.0", "server_port": 8000}, {"--host": "0.0.0.0", "--port": "8000"}, []),
    ({"tp": 2}, {"--tensor-parallel-size": "2"}, []),
    ({"tp": 1}, {}, ["--tensor-parallel-size"]),
    ({"session_len": 8192}, {"--max-model-len": "8192"}, []),
    ({"max_batch_size": 16}, {"--max-num-seqs": "16"}, []),
    ({"model_name": "internvl2-2b"}, {"--served-model-name": "internvl2-2b"}, []),
    ({"quant_policy": 0}, {}, ["--kv-cache-dtype"]),
    ({"quant_policy": 4}, {"--kv-cache-dtype": "int4_per_token_head"}, []),
    ({"quant_policy": 8}, {"--kv-cache-dtype": "int8_per_token_head"}, []),
    ({"model_format": "hf"}, {}, ["--quantization"]),
    ({"trust_request_mm_kwargs": True}, {"--trust-request-mm-kwargs": True}, []),
]


@pytest.mark.parametrize("options, expected, absent", MAPPING, ids=[str(m[0]) for m in MAPPING])
def test_mapping_on_cuda(model_2b, options, expected, absent):
    args = build_vllm_args(model_2b, on_cpu=False, **options)
    flags = _flags(args)
    assert flags["--model"] == str(model_2b)
    for flag, value in expected.items():
        assert flags.get(flag) == value, args
    for flag in absent:
        assert flag not in flags, args
    assert "--trust-remote-code" not in args


def test_passthrough_comes_last_and_unchanged(model_2b):
    extra = ["--limit-mm-per-prompt", '{"image": 4}', "--seed", "7"]
    args = build_vllm_args(model_2b, on_cpu=False, tp=2, extra=extra)
    assert args[-4:] == extra


def _element_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def test_cpu_defaults(model_2b):
    plan = plan_server(model_2b, on_cpu=True)
    flags = _flags(plan.args)
    dtype = choose_cpu_dtype().dtype  # this machine's: bfloat16 with bfloat16 hardware, float32 without
    assert flags["--dtype"] == dtype and flags["--enforce-eager"] is True
    # one full session (max_position_embeddings of llm_config) of KV in the model's dtype, in whole GiB
    kv = 32768 * KV_PER_TOKEN_2B * _element_bytes(dtype) // 2
    assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": str(math.ceil(kv / GiB))}
    plan = plan_server(model_2b, on_cpu=True, session_len=4096)
    assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}


def test_cpu_defaults_yield_to_the_user(model_2b):
    args = build_vllm_args(model_2b, on_cpu=True, extra=["--dtype=float32", "--no-enforce-eager"])
    assert args.count("--dtype=float32") == 1 and "bfloat16" not in args and "--enforce-eager" not in args
    assert "--enforce-eager" not in build_vllm_args(model_2b, on_cpu=True, extra=["-O3"])
    plan = plan_server(model_2b, on_cpu=True, environ={"VLLM_CPU_KVCACHE_SPACE": "5"})
    assert plan.env == {} and any("VLLM_CPU_KVCACHE_SPACE=5" in n for n in plan.notes)
    # an explicit --kv-cache-memory-bytes must not be overridden by the legacy variable (vLLM lets it win)
    plan = plan_server(model_2b, on_cpu=True, extra=["--kv-cache-memory-bytes", str(2 * GiB)])
    assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": None}


@pytest.mark.parametrize("policy,kv_dtype", [(4, "int4_per_token_head"), (8, "int8_per_token_head")])
def test_quant_policy_on_cpu(model_2b, policy, kv_dtype):
    """The same dtypes as on CUDA: the plugin's CPU attention backend implements them (test_kv_cpu_*.py)."""
    assert _flags(build_vllm_args(model_2b, on_cpu=True, quant_policy=policy))["--kv-cache-dtype"] == kv_dtype


def test_cache_max_entry_count_on_cpu(model_2b):
    weights = _weights_2b() * _element_bytes(choose_cpu_dtype().dtype) // 2
    memory = MemoryInfo(free_bytes=20 * GiB, total_bytes=24 * GiB, device="cpu")
    plan = plan_server(model_2b, on_cpu=True, cache_max_entry_count=0.5, memory=memory,
                       environ={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert _flags(plan.args)["--kv-cache-memory-bytes"] == str(int(0.5 * (20 * GiB - weights)))
    assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": None}           # the legacy variable would win in vLLM
    assert any("ignored" in n for n in plan.notes)
    with pytest.raises(UsageError, match="nothing is left"):
        plan_server(model_2b, on_cpu=True, cache_max_entry_count=0.5,
                    memory=MemoryInfo(free_bytes=weights // 2, total_bytes=24 * GiB, device="cpu"))


NO_BF16 = (False, "no avx512_bf16/amx_bf16/bf16 in the CPU flags (has avx2)")


def test_cpu_memory_is_sized_in_the_chosen_dtype(model_2b, tmp_path, monkeypatch):
    """float32 (chosen on a CPU without bfloat16 arithmetic, or given) takes 4 bytes an element: twice the
    16-bit KV cache per token and weights; an AWQ checkpoint's int4 linears stay 4-bit."""
    monkeypatch.setattr(cpu_dtype, "bf16_hardware", lambda cpuinfo=None: NO_BF16)
    plan = plan_server(model_2b, on_cpu=True)
    assert _flags(plan.args)["--dtype"] == "float32"
    assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": str(math.ceil(32768 * KV_PER_TOKEN_2B * 2 / GiB))} == {
        "VLLM_CPU_KVCACHE_SPACE": "6"}
    assert any("float32: bfloat16 would be emulated" in n for n in plan.notes)
    for extra in (["--dtype", "bfloat16"], ["--dtype=bfloat16"]):  # the user's dtype sizes it
        assert plan_server(model_2b, on_cpu=True, extra=extra).env == {"VLLM_CPU_KVCACHE_SPACE": "3"}
    # a quantized KV cache (--quant-policy 8/4) is sized in its own format, whatever the model's dtype
    from internvl_plugin.memory import LLMShape, kv_bytes_per_token
    for policy in (8, 4):
        per_token = kv_bytes_per_token(LLMShape.from_hf_config(LLM_2B), policy)
        assert plan_server(model_2b, on_cpu=True, quant_policy=policy).env == {
            "VLLM_CPU_KVCACHE_SPACE": str(math.ceil(32768 * per_token / GiB))} != plan.env

    memory = MemoryInfo(free_bytes=20 * GiB, total_bytes=24 * GiB, device="cpu")

    def kv_bytes(folder, *extra):
        return int(_flags(build_vllm_args(folder, on_cpu=True, cache_max_entry_count=0.5, memory=memory,
                                          extra=list(extra)))["--kv-cache-memory-bytes"])

    weights = _weights_2b()
    assert kv_bytes(model_2b) == int(0.5 * (20 * GiB - 2 * weights))
    assert kv_bytes(model_2b, "--dtype", "float16") == int(0.5 * (20 * GiB - weights))
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}
    top = _model_dir(tmp_path / "awq-top", dict(CONFIG_2B, quantization_config=awq))
    awq16, awq32 = kv_bytes(top), kv_bytes(top, "--dtype=float32")  # AWQ: bfloat16 unless float32 is given
    # float32 adds the 16-bit part again (vision, projector, embeddings, norms), not the int4 linears
    from internvl_plugin.memory import LLMShape, estimate_from_config
    est = estimate_from_config(dict(CONFIG_2B, quantization_config=awq), weight_format="w4a16")
    llm = LLMShape.from_hf_config(LLM_2B)
    floats = est.vision_bytes + est.projector_bytes + (llm.embedding_params + llm.norm_params) * 2
    assert awq16 == int(0.5 * (20 * GiB - est.total_bytes))
    assert awq32 == int(0.5 * (20 * GiB - est.total_bytes - floats))
    assert kv_bytes(model_2b) < awq32 < awq16


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu", "gpu"])
def test_demo_server_has_the_media_policy_and_the_cpu_dtype_only_on_cpu(tmp_path, on_cpu):
    from hub_cli.demo import demo_server
    from internvl_plugin.media_policy import ALLOW_ENV, MIDDLEWARE

    argv, env = demo_server(tmp_path, "127.0.0.1", 8000, on_cpu=on_cpu)
    flags = _flags(argv[argv.index("--model"):])
    assert flags["--middleware"] == MIDDLEWARE and flags["--allowed-media-domains"].endswith(".invalid")
    assert env == {}
    # a CPU vLLM gets this machine's CPU dtype; on a GPU vLLM picks its own (no bfloat16/float32 forced)
    assert flags.get("--dtype") == (choose_cpu_dtype().dtype if on_cpu else None)
    assert demo_server(tmp_path, "127.0.0.1", 8000, allow_media_hosts="127.0.0.1/32", on_cpu=on_cpu)[1] == {
        ALLOW_ENV: "127.0.0.1/32"}


def test_demo_refuses_a_bad_allow_list_before_building(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--cache-dir", str(tmp_path), "--allow-media-hosts", "10.0.0.0/99"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hub_cli demo: error: --allow-media-hosts: "), result.output
    assert not any(tmp_path.iterdir())  # nothing built


def test_cache_max_entry_count_on_cuda(model_2b):
    weights = _weights_2b()
    memory = MemoryInfo(free_bytes=78 * GiB, total_bytes=80 * GiB, device="cuda")
    util = float(_flags(build_vllm_args(model_2b, on_cpu=False, cache_max_entry_count=0.5,
                                        memory=memory))["--gpu-memory-utilization"])
    kv = 0.5 * (78 * GiB - weights)
    assert util == pytest.approx((weights + kv + ACTIVATION_ALLOWANCE) / (80 * GiB), abs=1e-3)
    # tensor parallel: each GPU holds a share of the weights
    util_tp = float(_flags(build_vllm_args(model_2b, on_cpu=False, tp=2, cache_max_entry_count=0.5,
                                           memory=memory))["--gpu-memory-utilization"])
    kv_tp = 0.5 * (78 * GiB - weights // 2)
    assert util_tp == pytest.approx((weights // 2 + kv_tp + ACTIVATION_ALLOWANCE) / (80 * GiB), abs=1e-3)
    # never more than is free now (vLLM refuses to start otherwise)
    util_all = float(_flags(build_vllm_args(model_2b, on_cpu=False, cache_max_entry_count=1.0,
                                            memory=memory))["--gpu-memory-utilization"])
    assert util_all == pytest.approx(78 / 80, abs=1e-3) and util_all <= 78 / 80
    # memory unknown: approximate, and said so
    plan = plan_server(model_2b, on_cpu=False, cache_max_entry_count=0.4)
    assert _flags(plan.args)["--gpu-memory-utilization"] == "0.400"
    assert any("approximate" in n for n in plan.notes)


def test_awq_model_format(tmp_path, model_2b):
    with pytest.raises(UsageError, match="no quantization_config"):
        build_vllm_args(model_2b, on_cpu=False, model_format="awq")
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}
    top = _model_dir(tmp_path / "awq-top", dict(CONFIG_2B, quantization_config=awq))
    nested = _model_dir(tmp_path / "awq-nested", dict(CONFIG_2B, llm_config=dict(LLM_2B, quantization_config=awq)))
    ours = _model_dir(tmp_path / "awq-ours", dict(CONFIG_2B, quantization_config=dict(awq, quant_method="awq_w4a16")))
    for folder in (top, nested, ours):
        args = build_vllm_args(folder, on_cpu=False, model_format="awq")
        assert "--quantization" not in args       # vLLM reads the checkpoint's quantization_config
    gptq = _model_dir(tmp_path / "gptq", dict(CONFIG_2B, quantization_config={"quant_method": "gptq"}))
    with pytest.raises(UsageError, match="'gptq', not AWQ"):
        build_vllm_args(gptq, on_cpu=False, model_format="awq")
    with pytest.raises(UsageError) as info:
        build_vllm_args(model_2b, on_cpu=False, model_format="awq")
    assert "awq_tools" not in info.value.message and "lmdeploy lite auto_awq" in info.value.message
    # an AWQ checkpoint's KV budget is computed from its W4A16 size, not from 16-bit weights
    memory = MemoryInfo(free_bytes=20 * GiB, total_bytes=24 * GiB, device="cpu")
    kv_awq = int(_flags(build_vllm_args(top, on_cpu=True, cache_max_entry_count=0.5, memory=memory))[
        "--kv-cache-memory-bytes"])
    kv_fp16 = int(_flags(build_vllm_args(model_2b, on_cpu=True, cache_max_entry_count=0.5, memory=memory))[
        "--kv-cache-memory-bytes"])
    assert kv_awq > kv_fp16


def test_awq_side_file_is_named_to_vllm(tmp_path, model_2b):
    """An older AutoAWQ folder keeps its config only in quant_config.json, which vLLM reads only when the
    method is named: serve names it (with or without --model-format awq), sized as W4A16 at its group size."""
    side = _model_dir(tmp_path / "awq-side-file", CONFIG_2B)
    (side / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 64, "w_bit": 4,
                                                         "version": "GEMM"}))
    for model_format in (None, "awq"):
        plan = plan_server(side, on_cpu=False, model_format=model_format)
        assert _flags(plan.args)["--quantization"] == "awq_w4a16"
        assert any("quant_config.json holds the AWQ quantization_config" in n for n in plan.notes)
    assert "--quantization" not in build_vllm_args(side, on_cpu=False, model_format="hf")
    assert build_vllm_args(side, on_cpu=False, extra=["--quantization", "awq"]).count("--quantization") == 1
    memory = MemoryInfo(free_bytes=20 * GiB, total_bytes=24 * GiB, device="cpu")
    kv = {folder.name: int(_flags(build_vllm_args(folder, on_cpu=True, cache_max_entry_count=0.5, memory=memory))[
        "--kv-cache-memory-bytes"]) for folder in (side, model_2b)}
    assert kv["awq-side-file"] > kv[model_2b.name]


@pytest.mark.parametrize("options, extra, fragment", [
    ({"tp": 2}, ["--tensor-parallel-size", "2"], "--tp and --tensor-parallel-size"),
    ({"tp": 2}, ["-tp", "2"], "--tp and -tp"),
    ({"session_len": 4096}, ["--max_model_len=2048"], "--session-len and --max-model-len"),
    ({"model_name": "a"}, ["--served-model-name", "b"], "--model-name and --served-model-name"),
    ({"quant_policy": 8}, ["--kv-cache-dtype", "fp8"], "--quant-policy and --kv-cache-dtype"),
    ({"cache_max_entry_count": 0.5}, ["--gpu-memory-utilization", "0.9"], "--cache-max-entry-count and"),
    ({}, ["--model", "/elsewhere"], "--model after '--'"),
    ({}, ["--port", "1"], "use --server-port"),
    ({}, ["--trust-remote-code"], "--trust-remote-code is not needed"),
])
def test_contradictions_are_usage_errors(model_2b, options, extra, fragment):
    with pytest.raises(UsageError) as info:
        build_vllm_args(model_2b, on_cpu=False, extra=extra, **options)
    assert fragment in info.value.message


def test_cli_imports_neither_torch_nor_vllm():
    """serve reads AWQ checkpoints through internvl_plugin.awq_checkpoint and sizes them with
    internvl_plugin.memory; neither may pull torch or vLLM into the CLI (hub_cli --help stays instant)."""
    code = ("import sys, hub_cli.cli, awq_tools.cli, internvl_plugin.awq_checkpoint, internvl_plugin.memory; "
            "print(sorted(m for m in ('torch', 'vllm', 'triton', 'internvl_kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_folder_without_config(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        build_vllm_args(tmp_path, on_cpu=False)


# ---------------------------------------------------------------------------------------------------------
# MODEL_OR_REPO resolution
# ---------------------------------------------------------------------------------------------------------
def _no_fetch(*args, **kwargs):
    raise AssertionError("fetch must not be called")


def test_local_folder_is_used_as_is(model_2b, monkeypatch):
    monkeypatch.chdir(model_2b.parent)
    resolved = resolve_model("InternVL2-2B", fetcher=_no_fetch)
    assert resolved.path == model_2b.resolve() and resolved.repo is None and resolved.served_name == "InternVL2-2B"


def test_unusable_model_arguments(tmp_path, model_2b):
    with pytest.raises(NotFoundError) as info:
        resolve_model(str(tmp_path / "missing"), fetcher=_no_fetch)
    assert str(tmp_path / "missing") in info.value.message and "repo id" in info.value.message
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"), fetcher=_no_fetch)
    with pytest.raises(UsageError, match="--revision"):
        resolve_model(str(model_2b), revision="v2", fetcher=_no_fetch)
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "missing"), "--dry-run"])
    assert result.exit_code == 3
    assert result.output.strip() == (f"hub_cli serve: error: no such model folder: {tmp_path / 'missing'} "
                                     "(and it is not a repo id OWNER/NAME)")


_NETGUARD = NETGUARD_SITECUSTOMIZE

_RESOLVE_TWICE = """
import json, sys
from hub_cli.serve import resolve_model
endpoint, target = sys.argv[1], sys.argv[2]
first = resolve_model("owner/tiny-vl", source="hf", download_dir=target, endpoint=endpoint, quiet=True)
second = resolve_model("owner/tiny-vl", source="hf", download_dir=target, endpoint=endpoint, quiet=True)
print(json.dumps([str(first.path), first.fetched, str(second.path), second.fetched, first.served_name]))
"""


@pytest.fixture
def hub_env(tmp_path):
    """A fake hub holding owner/tiny-vl and an environment for hub_cli subprocesses (spec hubs.md §6.9).

    huggingface_hub reads its environment at import, and other tests import it with HF_HUB_OFFLINE=1, so the
    HF client runs in a subprocess with a clean environment, as in test_hub_fetch.py.
    """
    repos = tmp_path / "repos"
    files = repos / "owner" / "tiny-vl" / "main"
    _model_dir(files, CONFIG_2B)
    (files / "model.safetensors").write_bytes(b"\0" * 4096)
    guard = tmp_path / "netguard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_NETGUARD)
    home = tmp_path / "home"
    home.mkdir()
    with FakeHub(repos) as hub:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HF_", "HUGGING", "MODELSCOPE_", "OPENXLAB_", "HUB_CLI_"))
               and k not in ("TRANSFORMERS_OFFLINE",)}
        env.update(HOME=str(home), HF_HOME=str(home / "hf"), HF_ENDPOINT=hub.hf_endpoint, HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HUB_CLI_RETRY_BACKOFF="0.01",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(guard), env.get("PYTHONPATH")])))
        yield hub, env, home


def test_repo_id_is_fetched_once(hub_env, tmp_path):
    hub, env, _ = hub_env
    target = tmp_path / "downloads" / "tiny-vl"
    proc = subprocess.run([sys.executable, "-c", _RESOLVE_TWICE, hub.hf_endpoint, str(target)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, first_fetched, second, second_fetched, served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first == second == str(target.resolve())
    assert (first_fetched, second_fetched, served) == (True, False, "owner/tiny-vl")
    assert json.loads((target / "config.json").read_text()) == CONFIG_2B
    assert json.loads((target / COMPLETE_MARKER).read_text()) == {"repo": "owner/tiny-vl", "source": "hf",
                                                                  "revision": None}
    downloads = [r.file_key for r in hub.requests(kind="file", method="GET")]
    assert sorted(downloads) == ["owner/tiny-vl/config.json", "owner/tiny-vl/model.safetensors"]  # once each


def test_serve_dry_run_fetches_into_the_default_folder(hub_env):
    hub, env, home = hub_env
    proc = subprocess.run([str(HUB_CLI), "serve", "owner/tiny-vl", "--dry-run", "--session-len", "2048"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = home / ".cache" / "vllm-internvl" / "models" / "owner" / "tiny-vl"
    assert (target / "model.safetensors").is_file()
    command = proc.stdout.strip().splitlines()[-1]
    assert f"--model {target}" in command and "--served-model-name owner/tiny-vl" in command
    assert "--max-model-len 2048" in command and "--trust-remote-code" not in command


# ---------------------------------------------------------------------------------------------------------
# One real server (hub_cli serve on CPU), then hub_cli chat through a pseudo-terminal against it
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from internvl_plugin.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("serve")
    model = build_tiny_model("internvl2-2b", root / "tiny-internvl2-2b")
    port = _free_port()
    log = root / "serve.log"
    # the real multi-process server, the plugin by entry point, serve's own KV size
    argv = [HUB_CLI, "serve", model, "--server-port", port, "--session-len", "4096", "--max-batch-size", "4"]
    with cli_server(argv, log, port=port,
                    drop_env=("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE")) as base:
        yield base, model, log


@pytest.mark.slow
def test_serve_answers_an_image_request(served):
    import openai

    base, model, log = served
    text = log.read_text()
    assert f"curl -s {base}/v1/chat/completions" in text and f"hub_cli chat {base}" in text
    assert "--enforce-eager" in text and f"--dtype {choose_cpu_dtype().dtype}" in text and "--max-num-seqs 4" in text
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [str(model)]   # the name as typed, as in LMDeploy
    url = "data:image/png;base64," + base64.b64encode(png_bytes(640, 480, (10, 200, 30))).decode()
    resp = client.chat.completions.create(model=str(model), max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "Describe the image."}]}])
    assert resp.choices[0].message.content
    assert resp.usage.completion_tokens == 6
    assert resp.usage.prompt_tokens > 7 * 256    # 640x480 -> 3x2 tiles + thumbnail, 256 tokens each


class _Terminal:
    """A child process on a pseudo-terminal: send keystrokes, wait for output."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.output = ""
        self.pos = 0

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        """Wait for ``pattern`` in the output after the previous match; return the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.S)
        while True:
            match = regex.search(self.output, self.pos)
            if match:
                self.pos = match.end()
                return match
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in:\n{self.output[-3000:]}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:   # the child closed the terminal
                    chunk = b""
                if not chunk:
                    assert regex.search(self.output, self.pos), f"no {pattern!r} before EOF:\n{self.output[-3000:]}"
                    continue
                self.output += chunk.decode(errors="replace")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _chat(base: str, *extra: str) -> _Terminal:
    env = dict(os.environ, TERM="dumb", COLUMNS="200")
    return _Terminal([str(HUB_CLI), "chat", base, "--max-tokens", "8", "--temperature", "0", *extra], env)


@pytest.mark.slow
def test_chat_with_an_image(served, tmp_path):
    base, model, _ = served
    image = tmp_path / "green.png"
    image.write_bytes(png_bytes(320, 240, (10, 200, 30)))
    term = _chat(base)
    try:
        term.expect(rf"talking to '{re.escape(str(model))}'")
        term.expect(r"user> ")
        term.send(f"/image {image}\n")
        term.expect(r"image attached to your next message \(1 pending\)")
        term.expect(r"user> ")
        term.send("What is in the picture?\n")
        answer = term.expect(r"assistant> (.*?)user> ").group(1)
        assert answer.strip(), term.output
        term.send("/exit\n")
        assert term.wait() == 0, term.output
    finally:
        term.kill()


@pytest.mark.slow
def test_chat_bad_image_then_goes_on(served, tmp_path):
    base, _, _ = served
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("plain text")
    term = _chat(base, "--system", "You are terse.")
    try:
        term.expect(r"user> ")
        term.send(f"/image {tmp_path / 'missing.png'}\n")
        term.expect(rf"\[error: no such file: {re.escape(str(tmp_path / 'missing.png'))}\]")
        term.expect(r"user> ")
        term.send(f"/image {not_an_image}\n")
        term.expect(r"\[error: not an image .*?notes\.txt\]")
        term.expect(r"user> ")
        term.send("Hello?\n")
        assert term.expect(r"assistant> (.*?)user> ").group(1).strip(), term.output
        term.send("\x04")   # Ctrl-D
        assert term.wait() == 0, term.output
        assert "Traceback" not in term.output
    finally:
        term.kill()


def test_chat_unreachable_url_is_one_line():
    port = _free_port()   # nobody listens there
    result = CliRunner().invoke(main, ["chat", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 6
    assert result.output.strip() == (f"hub_cli chat: error: cannot reach an OpenAI-compatible server at "
                                     f"http://127.0.0.1:{port}/v1")


# ---------------------------------------------------------------------------------------------------------
# The chat loop itself, with a stand-in for the openai client (history, /reset, images, errors)
# ---------------------------------------------------------------------------------------------------------
class _FakeCompletions:
    def __init__(self, replies):
        self.replies, self.requests = list(replies), []

    def create(self, **request):
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        from types import SimpleNamespace as NS

        return iter([NS(choices=[NS(delta=NS(content=piece))]) for piece in reply] + [NS(choices=[])])


class _FakeClient:
    def __init__(self, replies):
        from types import SimpleNamespace as NS

        self.completions = _FakeCompletions(replies)
        self.chat = NS(completions=self.completions)


def test_chat_loop_history_reset_and_images(tmp_path):
    import httpx
    import openai

    from hub_cli.chat import ChatSession, run_chat

    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(jpeg, format="JPEG")
    too_long = openai.BadRequestError("bad", response=httpx.Response(400, request=httpx.Request("POST", "http://x")),
                                      body={"message": "The decoder prompt (length 9000) is longer than the maximum"})
    client = _FakeClient([["Hel", "lo"], too_long, ["A red ", "photo."], ["Fresh start."]])
    out, errors = io.StringIO(), []
    session = ChatSession(client, "m", system="Be brief.", max_tokens=9, temperature=0.0, out=out)
    lines = iter(["hi", f"/image {jpeg}", "/image https://example.invalid/cat.png", "what is it?", "again?", "/reset",
                  "new topic", "/exit", "never read"])
    assert run_chat(session, lambda prompt: next(lines), errors.append) == 0
    first, failed, retried, after_reset = client.completions.requests
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert first["max_tokens"] == 9 and first["temperature"] == 0.0 and first["stream"] is True
    # the failed turn was dropped; its images stayed pending for the next message
    images = failed["messages"][-1]["content"][:2]
    assert images[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(images[0]["image_url"]["url"].split(",", 1)[1]) == jpeg.read_bytes()
    assert images[1]["image_url"]["url"] == "https://example.invalid/cat.png"
    assert retried["messages"][:3] == first["messages"] + [{"role": "assistant", "content": "Hello"}]
    assert retried["messages"][3]["content"] == images + [{"type": "text", "text": "again?"}]
    assert after_reset["messages"] == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "new topic"}]
    assert "assistant> Hello\n" in out.getvalue() and "assistant> A red photo.\n" in out.getvalue()
    assert any(e.startswith("error: the server answered HTTP 400: The decoder prompt") for e in errors), errors
    assert session.history[-1] == {"role": "assistant", "content": "Fresh start."}


def test_chat_end_of_input_exits_cleanly():
    from hub_cli.chat import ChatSession, run_chat

    def eof(prompt):
        raise EOFError

    assert run_chat(ChatSession(_FakeClient([]), "m", out=io.StringIO()), eof, print) == 0
