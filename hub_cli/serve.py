"""``hub_cli serve``: vLLM's OpenAI-compatible server, driven with the flags LMDeploy users already type.

Three steps, each a library function that tests call directly:

1. :func:`resolve_model` turns MODEL_OR_REPO into a local folder: a folder is used as is; a repo id
   ``OWNER/NAME`` is fetched first (:func:`hub_cli.fetch.fetch`) into ``--download-dir`` unless a complete
   copy is already there.
2. :func:`plan_server` (and :func:`build_vllm_args`, its argument list) maps LMDeploy's flags onto vLLM's
   arguments and environment. It is pure: the machine's memory comes in as a :class:`MemoryInfo`
   (:func:`probe_memory` reads it), the platform as ``on_cpu``.
3. :func:`hub_cli.launch.run_server` starts ``python -m vllm.entrypoints.openai.api_server`` with them and
   prints a ready-to-paste request once the server is healthy.

Mapping and its semantics differences: see the module constants below and the README's serve section.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub_cli.errors import NotFoundError, UsageError
from hub_cli.fetch import is_repo_id
from hub_cli.generation import TURN_END, generation_config_with_turn_end
from hub_cli.mm_budget import plan_mm_budget
from internvl_plugin import media_policy
from internvl_plugin.cpu_dtype import choose_cpu_dtype
from internvl_plugin.json_files import JsonFileError, read_json_object
from internvl_plugin.awq_checkpoint import (METHOD_NAME, FoundQuantizationConfig, find_quantization_config,
                                           group_size_or_default)

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "KV_DTYPE_FOR_QUANT_POLICY", "ResolvedModel", "MemoryInfo",
           "ServerPlan", "default_download_dir", "resolve_model", "probe_memory", "plan_server", "build_vllm_args",
           "apply_env", "plan_media_policy", "prepare_server", "printable_command", "ready_message"]

DEFAULT_HOST = "127.0.0.1"           # loopback unless the user asks: the server has no authentication
DEFAULT_PORT = 23333                 # LMDeploy's api_server default
GiB = 1 << 30
# LMDeploy --quant-policy -> vLLM --kv-cache-dtype (per-token-head scales computed online, like LMDeploy's).
KV_DTYPE_FOR_QUANT_POLICY = {0: None, 4: "int4_per_token_head", 8: "int8_per_token_head"}
# On CPU the plugin's attention backend (internvl_plugin/cpu_kv_attention.py) implements both dtypes; vLLM's own
# CPU attention does not (vllm-plugin-guide.md §4.5).
# vLLM takes its activation peak (the ViT on the most tiles, a max-size prefill) and CUDA graphs out of the
# same --gpu-memory-utilization budget as weights and KV; LMDeploy does not reserve them. An allowance keeps
# the KV cache close to what LMDeploy's ratio would give.
ACTIVATION_ALLOWANCE = 3 * GiB // 2
COMPLETE_MARKER = Path(".hub_cli") / "serve-complete.json"
# The media policy (internvl_plugin/media_policy.py) checks and fetches every request image itself and hands vLLM
# data URLs; vLLM's own fetcher is then limited to a domain that cannot exist, so an image URL in a request the
# middleware does not read (another endpoint) is refused instead of fetched unchecked.
MEDIA_MIDDLEWARE = media_policy.MIDDLEWARE
MEDIA_ALLOW_ENV = media_policy.ALLOW_ENV
NO_VLLM_FETCH_DOMAIN = "media-fetched-by-vllm-internvl.invalid"
_DTYPE_BYTES = {"float32": 4, "float": 4}  # vLLM --dtype values of 4-byte floats; the others are 16-bit

# vLLM flags that our own options set; given after "--" too, they would contradict each other.
_OWN_FLAGS = {
    "--model": "MODEL_OR_REPO", "--host": "--server-name", "--port": "--server-port",
}
_CONFLICTS = {  # our option -> the vLLM flags (and aliases) it produces
    "tp": ("--tp", ("--tensor-parallel-size", "-tp")),
    "session_len": ("--session-len", ("--max-model-len",)),
    "max_batch_size": ("--max-batch-size", ("--max-num-seqs",)),
    "model_name": ("--model-name", ("--served-model-name",)),
    "quant_policy": ("--quant-policy", ("--kv-cache-dtype",)),
    "cache_max_entry_count": ("--cache-max-entry-count", ("--gpu-memory-utilization", "--device-memory-utilization",
                                                          "--kv-cache-memory-bytes")),
}
_COMPILE_FLAGS = ("--enforce-eager", "--no-enforce-eager", "--compilation-config", "-cc", "-O")


# ---------------------------------------------------------------------------------------------------------
# 1. MODEL_OR_REPO -> a local folder
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedModel:
    path: Path                 # the folder vLLM loads
    repo: str | None           # the repo id when MODEL_OR_REPO was one
    served_name: str           # default --served-model-name: what the user typed (LMDeploy's default too)
    fetched: bool = False      # True when this call downloaded (or completed) it


def default_download_dir(repo: str) -> Path:
    owner, name = repo.split("/", 1)
    return Path.home() / ".cache" / "vllm-internvl" / "models" / owner / name


def resolve_model(model_or_repo: str, *, source: str = "hf", revision: str | None = None,
                  download_dir: str | os.PathLike[str] | None = None, token: str | None = None,
                  endpoint: str | None = None, quiet: bool = False,
                  fetcher: Callable[..., Path] | None = None) -> ResolvedModel:
    """A local folder as is; a repo id fetched into ``download_dir`` (default ~/.cache/vllm-internvl/models/O/N).

    A repo is fetched again (which verifies and resumes, downloading only what is missing) unless a previous
    call completed the same repo, source and revision there. Raises a HubCliError with a one-line message.
    """
    local = Path(model_or_repo).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UsageError(f"{model_or_repo} is a file; MODEL_OR_REPO is a model folder or a repo id OWNER/NAME")
        if revision:
            raise UsageError(f"--revision applies to repo ids, and {model_or_repo} is a local folder")
        return ResolvedModel(path=local.resolve(), repo=None, served_name=model_or_repo)
    if not is_repo_id(model_or_repo):
        raise NotFoundError(f"no such model folder: {model_or_repo} (and it is not a repo id OWNER/NAME)")

    target = Path(download_dir).expanduser() if download_dir else default_download_dir(model_or_repo)
    want = {"repo": model_or_repo, "source": source, "revision": revision}
    if _complete(target) == want and (target / "config.json").is_file():
        return ResolvedModel(path=target.resolve(), repo=model_or_repo, served_name=model_or_repo)
    if fetcher is None:
        from hub_cli.fetch import fetch as fetcher
    path = Path(fetcher(model_or_repo, source=source, revision=revision, local_dir=target, token=token,
                        endpoint=endpoint, quiet=quiet))
    marker = path / COMPLETE_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(want))
    return ResolvedModel(path=path.resolve(), repo=model_or_repo, served_name=model_or_repo, fetched=True)


def _complete(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------
# 2. LMDeploy flags -> vLLM arguments and environment
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryInfo:
    """Memory of the device the KV cache lives on: RAM on CPU, the smallest of the ``--tp`` GPUs on CUDA."""

    free_bytes: int
    total_bytes: int
    device: str                # "cpu" or "cuda"


@dataclass
class ServerPlan:
    args: list[str]                                           # vLLM's arguments, from --model on
    env: dict[str, str | None] = field(default_factory=dict)  # set (str) or remove (None) in the server's env
    notes: list[str] = field(default_factory=list)            # one-line remarks for the user


def build_vllm_args(model_dir: str | os.PathLike[str], **options: Any) -> list[str]:
    """vLLM arguments for ``model_dir`` and LMDeploy-style options (see :func:`plan_server`)."""
    return plan_server(model_dir, **options).args


def plan_server(model_dir: str | os.PathLike[str], *, server_name: str = DEFAULT_HOST,
                server_port: int = DEFAULT_PORT, tp: int = 1, cache_max_entry_count: float | None = None,
                quant_policy: int = 0, model_format: str | None = None, model_name: str | None = None,
                session_len: int | None = None, max_batch_size: int | None = None,
                trust_request_mm_kwargs: bool = False, allow_media_hosts: str | None = None,
                max_dynamic_patch: int | None = None, extra: Sequence[str] = (), on_cpu: bool | None = None,
                memory: MemoryInfo | None = None, environ: Mapping[str, str] | None = None) -> ServerPlan:
    """Map LMDeploy's serve flags onto vLLM's; raise UsageError for a request that cannot be honoured.

    ``on_cpu`` defaults to :func:`hub_cli.launch.is_cpu_vllm`; ``memory`` is needed for an exact
    ``cache_max_entry_count`` mapping (without it the mapping is approximate and a note says so);
    ``environ`` is the user's environment (only ``VLLM_CPU_KVCACHE_SPACE`` is read).
    """
    if on_cpu is None:
        from hub_cli.launch import is_cpu_vllm

        on_cpu = is_cpu_vllm()
    environ = environ or {}
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    given = _flag_names(extra)
    _check_extra(given, dict(tp=tp, session_len=session_len, max_batch_size=max_batch_size, model_name=model_name,
                             quant_policy=quant_policy, cache_max_entry_count=cache_max_entry_count))

    plan = ServerPlan(args=["--model", str(model_dir), "--host", server_name, "--port", str(server_port)])
    args, notes = plan.args, plan.notes
    if model_name:
        args += ["--served-model-name", model_name]
    if tp != 1:
        args += ["--tensor-parallel-size", str(tp)]
    if session_len:
        args += ["--max-model-len", str(session_len)]
    if max_batch_size:
        args += ["--max-num-seqs", str(max_batch_size)]

    quant_cfg = find_quantization_config(config, model_dir)
    _check_model_format(model_format, quant_cfg, model_dir, notes)
    if (quant_cfg is not None and quant_cfg.is_awq and not quant_cfg.in_config_json
            and (model_format or "").lower() != "hf" and "--quantization" not in given):
        # vLLM looks for a side file only when the method is named (ModelConfig finds no quantization_config)
        args += ["--quantization", METHOD_NAME]
        notes.append(f"{quant_cfg.file} holds the AWQ quantization_config (config.json has none): "
                     f"passing --quantization {METHOD_NAME} so that vLLM reads it")

    if quant_policy not in KV_DTYPE_FOR_QUANT_POLICY:
        raise UsageError(f"--quant-policy must be 0, 4 or 8, not {quant_policy}")
    kv_dtype = KV_DTYPE_FOR_QUANT_POLICY[quant_policy]
    if kv_dtype:
        args += ["--kv-cache-dtype", kv_dtype]

    if on_cpu:
        # bfloat16 where the CPU has it, else float32; AWQ bfloat16 (cpu_dtype.py); the user's --dtype wins. Weights
        # and KV cache are sized in that dtype (float32: 4 bytes an element).
        choice = choose_cpu_dtype(given_value(extra, "--dtype"), quantized=quant_cfg is not None and quant_cfg.is_awq)
        element = _DTYPE_BYTES.get(choice.dtype, 2)
        weights = _weight_bytes(config, model_dir, quant_cfg, element)
        _plan_cpu_memory(plan, config, weights, cache_max_entry_count, session_len, tp, memory, environ, given,
                         element, quant_policy)
        if "--dtype" not in given:
            args += ["--dtype", choice.dtype]
            notes.append(f"--dtype {choice.reason}")
        if not given & set(_COMPILE_FLAGS):
            args += ["--enforce-eager"]   # inductor compilation costs 20 s+ at start-up on CPU
    elif cache_max_entry_count is not None:
        _plan_cuda_memory(plan, _weight_bytes(config, model_dir, quant_cfg), cache_max_entry_count, tp, memory)

    if trust_request_mm_kwargs and "--trust-request-mm-kwargs" not in given:
        args += ["--trust-request-mm-kwargs"]
    plan_mm_budget(plan, config, max_dynamic_patch=max_dynamic_patch, session_len=session_len, given=given,
                   trust_request_mm_kwargs=trust_request_mm_kwargs or "--trust-request-mm-kwargs" in given)
    plan_media_policy(plan, allow_media_hosts, given)
    if "--generation-config" not in given:
        folder = generation_config_with_turn_end(model_dir, config)
        if folder is not None:
            args += ["--generation-config", str(folder)]
            notes.append(f"XComposer2 ends a turn with {TURN_END}, which the model's generation config does not "
                         f"stop on: passing --generation-config {folder} (a copy of it with that stop id)")
    if server_name not in ("127.0.0.1", "localhost", "::1") and "--api-key" not in given:
        notes.append(f"the server listens on {server_name} without authentication; add -- --api-key KEY "
                     "to require one")
    args += list(extra)
    return plan


def plan_media_policy(plan: ServerPlan, allow: str | None, given: set[str]) -> None:
    """Image URLs: public http(s) addresses only, unless ``allow`` (hosts, addresses, CIDR ranges) says more."""
    if allow:
        try:
            media_policy.parse_allow(allow)
        except ValueError as exc:
            raise UsageError(f"--allow-media-hosts: {exc}") from None
        plan.env[MEDIA_ALLOW_ENV] = allow
        plan.notes.append(f"image URLs may also point at {allow} (--allow-media-hosts)")
    plan.args += ["--middleware", MEDIA_MIDDLEWARE]
    if "--allowed-media-domains" not in given:
        plan.args += ["--allowed-media-domains", NO_VLLM_FETCH_DOMAIN]
    else:  # vLLM may fetch for the endpoints the middleware does not read: no redirects off the listed domains
        plan.env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"


def apply_env(env: dict[str, str], plan_env: Mapping[str, str | None]) -> dict[str, str]:
    """``env`` with the plan's settings applied (None removes a variable)."""
    env = dict(env)
    for key, value in plan_env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def probe_memory(on_cpu: bool, tp: int = 1) -> MemoryInfo | None:
    """Free and total memory where the KV cache goes, or None when it cannot be read.

    CPU: available and total RAM (psutil, else /proc/meminfo). CUDA: ``torch.cuda.mem_get_info`` of GPUs
    0..tp-1, read in a short-lived child process so that this process holds no CUDA context (which would
    take memory from the server for as long as it runs); the smallest free and total win, as in LMDeploy.
    """
    if on_cpu:
        try:
            import psutil

            vm = psutil.virtual_memory()
            return MemoryInfo(free_bytes=int(vm.available), total_bytes=int(vm.total), device="cpu")
        except ImportError:
            return _meminfo()
    script = ("import sys, torch\n"
              "for i in range(int(sys.argv[1])):\n"
              "    print(*torch.cuda.mem_get_info(i))\n")
    try:
        out = subprocess.run([sys.executable, "-c", script, str(tp)], capture_output=True, text=True,
                             timeout=180, check=True).stdout
        pairs = [tuple(int(v) for v in line.split()) for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if len(pairs) != tp:
        return None
    return MemoryInfo(free_bytes=min(p[0] for p in pairs), total_bytes=min(p[1] for p in pairs), device="cuda")


def _meminfo() -> MemoryInfo | None:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kib = {k: int(v.split()[0]) for k, v in fields.items() if k in ("MemAvailable", "MemTotal")}
        return MemoryInfo(free_bytes=kib["MemAvailable"] * 1024, total_bytes=kib["MemTotal"] * 1024, device="cpu")
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return read_json_object(model_dir / "config.json")
    except JsonFileError as exc:
        raise UsageError(f"{model_dir} has no config.json; is it a model folder?" if exc.missing else str(exc)) \
            from None


def _flag_names(extra: Sequence[str]) -> set[str]:
    """Option names among the pass-through arguments, normalised as vLLM's parser does (``_`` -> ``-``)."""
    names = set()
    for token in extra:
        if token.startswith("--"):
            names.add("--" + token[2:].split("=", 1)[0].replace("_", "-"))
        elif token.startswith("-O"):
            names.add("-O")
        elif token.startswith("-") and len(token) > 1 and not token[1].isdigit():
            names.add(token.split("=", 1)[0])
    return names


def _check_extra(given: set[str], options: Mapping[str, Any]) -> None:
    for flag, ours in _OWN_FLAGS.items():
        if flag in given:
            raise UsageError(f"{flag} after '--' is not allowed: use {ours}")
    if "--trust-remote-code" in given:
        raise UsageError("--trust-remote-code is not needed and not passed: the vllm-internvl plugin registers "
                         "the InternVL configs and tokenizers itself")
    defaults = {"tp": 1, "quant_policy": 0}
    for option, (ours, flags) in _CONFLICTS.items():
        value = options[option]
        if value is None or value == defaults.get(option):
            continue
        clash = [f for f in flags if f in given]
        if clash:
            raise UsageError(f"{ours} and {clash[0]} (after '--') both set the same thing; give only one")


def _check_model_format(model_format: str | None, quant_cfg: FoundQuantizationConfig | None, model_dir: Path,
                        notes: list[str]) -> None:
    if model_format is None:
        return
    fmt = model_format.lower()
    if fmt == "awq":
        if quant_cfg is None:
            raise UsageError(f"--model-format awq, but {model_dir / 'config.json'} has no quantization_config: "
                             "this is not an AWQ checkpoint (quantize it with LMDeploy's lmdeploy lite auto_awq "
                             "or with AutoAWQ, then serve the result)")
        if not quant_cfg.is_awq:
            raise UsageError(f"--model-format awq, but {model_dir / quant_cfg.file} says quant_method "
                             f"{quant_cfg.quant_method or '(none)'!r}, not AWQ")
        # no --quantization flag for config.json: vLLM picks the method from the checkpoint's quantization_config
        return
    if fmt == "hf":
        if quant_cfg is not None:
            method = quant_cfg.quant_method or "unknown method"
            notes.append(f"--model-format hf, but the checkpoint is quantized ({method}); vLLM loads it as its "
                         "quantization_config says")
        return
    raise UsageError(f"--model-format must be hf or awq, not {model_format!r}")


def _weight_bytes(config: Mapping[str, Any], model_dir: Path, quant_cfg: FoundQuantizationConfig | None,
                  element: int = 2) -> tuple[int, str]:
    """Bytes the weights take in memory with `element`-byte floats (W4A16 linears for AWQ), and how that was
    found out."""
    from internvl_plugin.memory import FP16_BYTES, LLMShape, estimate_from_config

    awq = quant_cfg is not None and quant_cfg.is_awq
    in_dtype = "" if element == FP16_BYTES else f", {element}-byte floats"
    if quant_cfg is None or awq:
        group = group_size_or_default(quant_cfg.config if awq else None)
        try:
            est = estimate_from_config(config, weight_format="w4a16" if awq else "fp16", group_size=group)
            floats = est.total_bytes  # the estimate's 16-bit part: all of it, or all but the AWQ linears
            if awq:
                llm = LLMShape.from_hf_config(config.get("llm_config") or config)
                floats = (est.vision_bytes + est.projector_bytes + est.extra_bytes
                          + (llm.embedding_params + llm.norm_params) * FP16_BYTES)
            return est.total_bytes + floats * (element - FP16_BYTES) // FP16_BYTES, \
                f"estimated from config.json{in_dtype}"
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            pass
    files = [p for p in model_dir.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if awq:
        return size, "size of the weight files"
    return size * element // FP16_BYTES, f"size of the weight files{in_dtype and ' (stored 16-bit)' + in_dtype}"


def _kv_bytes_per_token(config: Mapping[str, Any], element: int = 2, quant_policy: int = 0) -> int | None:
    from internvl_plugin.memory import FP16_BYTES, LLMShape, kv_bytes_per_token

    llm = config.get("llm_config") or config.get("text_config") or config
    try:
        shape = LLMShape.from_hf_config(llm)
        if quant_policy:  # int8/int4 pages whatever the model's dtype
            return kv_bytes_per_token(shape, quant_policy)
        return kv_bytes_per_token(shape, 0) * element // FP16_BYTES
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def given_value(extra: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` among the pass-through arguments (``--flag V`` or ``--flag=V``; the last wins)."""
    value = None
    for i, token in enumerate(extra):
        if token == flag and i + 1 < len(extra):
            value = extra[i + 1]
        elif token.startswith(flag + "="):
            value = token.split("=", 1)[1]
    return value


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _plan_cpu_memory(plan: ServerPlan, config: Mapping[str, Any], weights: tuple[int, str],
                     ratio: float | None, session_len: int | None, tp: int, memory: MemoryInfo | None,
                     environ: Mapping[str, str], given: set[str], element: int = 2, quant_policy: int = 0) -> None:
    """CPU: the KV cache is sized in bytes (vLLM's VLLM_CPU_KVCACHE_SPACE / --kv-cache-memory-bytes), in the
    model's dtype (`element` bytes: vLLM's CPU KV cache takes it) or the quant policy's int8/int4 format.

    vLLM reads VLLM_CPU_KVCACHE_SPACE after the arguments and lets it win, so whenever a size is given as an
    argument the variable is removed from the server's environment.
    """
    user_space = environ.get("VLLM_CPU_KVCACHE_SPACE")
    if ratio is not None:
        if memory is None:
            raise UsageError("--cache-max-entry-count: cannot read the available RAM on this machine; "
                             "size the KV cache with -- --kv-cache-memory-bytes BYTES instead")
        weight_bytes, how = weights
        room = memory.free_bytes - weight_bytes
        if room <= 0:
            raise UsageError(f"--cache-max-entry-count {ratio}: {_gib(memory.free_bytes)} of RAM is available and "
                             f"the weights need about {_gib(weight_bytes)}; nothing is left for a KV cache")
        kv = int(ratio * room) // tp
        plan.args += ["--kv-cache-memory-bytes", str(kv)]
        plan.env["VLLM_CPU_KVCACHE_SPACE"] = None
        per_rank = f" per rank (--tp {tp})" if tp > 1 else ""
        plan.notes.append(f"KV cache: {ratio} x ({_gib(memory.free_bytes)} RAM available - {_gib(weight_bytes)} "
                          f"weights, {how}) = {_gib(kv)}{per_rank} (--kv-cache-memory-bytes {kv})")
        if user_space:
            plan.notes.append(f"VLLM_CPU_KVCACHE_SPACE={user_space} from your environment is ignored: "
                              "--cache-max-entry-count is given")
        return
    if "--kv-cache-memory-bytes" in given:
        plan.env["VLLM_CPU_KVCACHE_SPACE"] = None
        return
    if user_space:
        plan.notes.append(f"KV cache: VLLM_CPU_KVCACHE_SPACE={user_space} GiB from your environment")
        return
    # LMDeploy's default (0.8 of free memory) would reserve most of the machine's RAM up front; instead hold
    # one full-length session, at least 1 GiB.
    per_token = _kv_bytes_per_token(config, element, quant_policy)
    tokens = session_len or max_positions(config)
    gib = max(1, math.ceil(per_token * tokens / GiB)) if per_token and tokens else 1
    plan.env["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
    sized = f"room for one {tokens}-token session" if per_token and tokens else "the model's shape is unknown"
    plan.notes.append(f"KV cache: {gib} GiB of RAM ({sized}); --cache-max-entry-count sets it as a share of the "
                      "free RAM instead")


def max_positions(config: Mapping[str, Any]) -> int | None:
    """The model's context length from its config.json dict (the LLM's part, or the top level), None if absent."""
    llm = config.get("llm_config") or config.get("text_config") or config
    value = llm.get("max_position_embeddings") if isinstance(llm, Mapping) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def _plan_cuda_memory(plan: ServerPlan, weights: tuple[int, str], ratio: float, tp: int,
                      memory: MemoryInfo | None) -> None:
    """CUDA: LMDeploy's share of free memory after weights -> vLLM's share of total memory for everything."""
    weight_bytes, how = weights
    if memory is None:
        util = min(max(ratio, 0.05), 0.95)
        plan.args += ["--gpu-memory-utilization", f"{util:.3f}"]
        plan.notes.append(f"--cache-max-entry-count {ratio} -> --gpu-memory-utilization {util:.3f} (approximate: "
                          "the GPU's memory could not be read; vLLM's fraction also covers the weights, so the "
                          "KV cache is smaller than LMDeploy's would be)")
        return
    per_gpu = weight_bytes // tp
    kv = ratio * (memory.free_bytes - per_gpu)
    if kv <= 0:
        raise UsageError(f"--cache-max-entry-count {ratio}: {_gib(memory.free_bytes)} free per GPU and the weights "
                         f"need about {_gib(per_gpu)} per GPU; nothing is left for a KV cache")
    util = (per_gpu + kv + ACTIVATION_ALLOWANCE) / memory.total_bytes
    cap = math.floor(memory.free_bytes / memory.total_bytes * 1000) / 1000  # vLLM refuses more than is free
    capped = util > cap
    util = max(min(util, cap), 0.01)
    plan.args += ["--gpu-memory-utilization", f"{util:.3f}"]
    plan.notes.append(
        f"--cache-max-entry-count {ratio} -> --gpu-memory-utilization {util:.3f}: KV {ratio} x "
        f"({_gib(memory.free_bytes)} free - {_gib(per_gpu)} weights, {how}) = {_gib(kv)}, plus the weights and "
        f"{_gib(ACTIVATION_ALLOWANCE)} for activations, of {_gib(memory.total_bytes)} per GPU"
        + ("; capped at what is free now" if capped else ""))


# ---------------------------------------------------------------------------------------------------------
# 3. Starting it (the command and its flags: hub_cli.cli.serve)
# ---------------------------------------------------------------------------------------------------------
def prepare_server(model_or_repo: str, *, host: str, port: int, source: str, revision: str | None,
                   download_dir: Path | None, tp: int, cache_max_entry_count: float | None, quant_policy: str,
                   model_format: str | None, model_name: str | None, session_len: int | None,
                   max_batch_size: int | None, trust_request_mm_kwargs: bool,
                   vllm_args: Sequence[str], allow_media_hosts: str | None = None, check: bool = True,
                   max_dynamic_patch: int | None = None) -> tuple[ResolvedModel, str, list[str], dict[str, str], list[str]]:
    """What serve and chat share: resolve, check the checkpoint (unless ``check`` is false), probe, plan.

    Returns (model, served name, argv, env, notes).
    """
    from hub_cli.launch import api_server_argv, is_cpu_vllm, server_env

    from hub_cli.checkpoint import check_checkpoint

    resolved = resolve_model(model_or_repo, source=source.lower(), revision=revision, download_dir=download_dir)
    if check:
        check_checkpoint(resolved.path)
    on_cpu = is_cpu_vllm()
    memory = probe_memory(on_cpu, tp) if (on_cpu or cache_max_entry_count is not None) else None
    served = model_name or resolved.served_name
    plan = plan_server(resolved.path, server_name=host, server_port=port, tp=tp,
                       cache_max_entry_count=cache_max_entry_count, quant_policy=int(quant_policy),
                       model_format=model_format, model_name=served, session_len=session_len,
                       max_batch_size=max_batch_size, trust_request_mm_kwargs=trust_request_mm_kwargs,
                       allow_media_hosts=allow_media_hosts, max_dynamic_patch=max_dynamic_patch, extra=vllm_args, on_cpu=on_cpu, memory=memory, environ=os.environ)
    env = apply_env(server_env(), plan.env)
    return resolved, served, api_server_argv(plan.args), env, plan.notes


def printable_command(argv: Sequence[str], env_changes: Mapping[str, str | None]) -> str:
    """The server command as a user could paste it (the interpreter shown as ``python``)."""
    words = ["python", *argv[1:]] if argv and argv[0] == sys.executable else list(argv)
    prefix = [f"{k}={shlex.quote(v)}" for k, v in env_changes.items() if v is not None]
    return " ".join(prefix + [shlex.join(words)])


def ready_message(base_url: str, served_name: str) -> str:
    from hub_cli.launch import curl_example

    return (f"\nvllm-internvl: '{served_name}' ready at {base_url}/v1. Try:\n\n"
            f"{curl_example(base_url, served_name)}\n\n"
            f"or chat in this terminal: hub_cli chat {base_url}\n\nCtrl-C stops the server.\n")
