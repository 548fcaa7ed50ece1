"""Tiny AWQ (W4A16) checkpoints for the quantization tests.

Round-to-nearest asymmetric 4-bit quantization of every decoder-layer linear of a tiny checkpoint
(spec internvl-and-quant.md B1.8, no smoothing), packed in the AWQ gemm format by
``internvl_kernels.quantize_awq``, written with the quantization_config where each producer puts it:

    "ours"      top-level quantization_config with modules_to_not_convert ["vision_model", "mlp1"]
    "lmdeploy"  ``lmdeploy lite auto_awq``: only llm_config.quantization_config, no
                modules_to_not_convert, everything unquantized saved in fp16 (B1.9)
    "autoawq"   AutoAWQ ``save_quantized``: top-level quantization_config from
                ``AwqConfig.to_transformers_dict()`` plus its ``quant_config.json``

``dequantized_copy`` turns any of them back into a dense checkpoint (float32 (q - z) * s linears,
no quantization_config) that the plain-PyTorch reference loads. Folders are written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from internvl_kernels import dequantize_awq, quantize_awq
from internvl_plugin.tiny import write_folder_atomically

QUANT_LAYOUTS = ("ours", "lmdeploy", "autoawq")

# nn.Linear weights inside the LLM decoder layers: InternLM2, Qwen2/Llama and Phi-3 names (spec A2.3).
DECODER_LINEAR = re.compile(
    r"^(?:language_model\.)?model\.layers\.\d+\."
    r"(?:attention\.(?:wqkv|wo)|feed_forward\.w[123]|self_attn\.(?:[qkvo]|qkv)_proj|mlp\.(?:gate|up|down|gate_up)_proj)"
    r"\.weight$")
WEIGHTS_FILE = "model.safetensors"


def quantize_tiny_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, layout: str, group_size: int,
                             scale_dtype: torch.dtype | None = None) -> Path:
    """Write an AWQ-quantized copy of the checkpoint folder `src` to `dst` in producer `layout`."""
    if layout not in QUANT_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {QUANT_LAYOUTS}")
    src = Path(src)
    scale_dtype = scale_dtype or (torch.bfloat16 if layout == "ours" else torch.float16)
    config = json.loads((src / "config.json").read_text())
    state = load_file(str(src / WEIGHTS_FILE))
    out: dict[str, torch.Tensor] = {}
    n_quantized = 0
    for name, tensor in state.items():
        if DECODER_LINEAR.match(name):
            base = name[: -len(".weight")]
            qweight, qzeros, scales = quantize_awq(tensor.float(), group_size, scale_dtype=scale_dtype)
            out.update({f"{base}.qweight": qweight, f"{base}.qzeros": qzeros, f"{base}.scales": scales})
            n_quantized += 1
        else:
            out[name] = tensor.to(torch.float16) if layout == "lmdeploy" else tensor
    if not n_quantized:
        raise ValueError(f"{src}: no decoder-layer linears found")

    extra_files: dict[str, dict] = {}
    if layout == "ours":
        config["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 4,
                                         "group_size": group_size, "zero_point": True,
                                         "modules_to_not_convert": ["vision_model", "mlp1"]}
    elif layout == "lmdeploy":
        llm = config.get("llm_config", config)
        llm["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 4,
                                      "group_size": group_size, "zero_point": True}
        config["torch_dtype"] = llm["torch_dtype"] = "float16"
    else:  # autoawq
        skip = ["vision_model"] if "vision_config" in config else None
        config["quantization_config"] = {"quant_method": "awq", "zero_point": True, "group_size": group_size,
                                         "bits": 4, "version": "gemm", "modules_to_not_convert": skip}
        extra_files["quant_config.json"] = {"zero_point": True, "q_group_size": group_size, "w_bit": 4,
                                            "version": "GEMM", "modules_to_not_convert": skip}

    def write(tmp: Path) -> None:
        _copy_side_files(src, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname, content in extra_files.items():
            (tmp / fname).write_text(json.dumps(content, indent=2))
        save_file(out, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})

    return _write_folder(Path(dst), write)


def dequantized_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dense copy of an AWQ checkpoint: each qweight/qzeros/scales triple becomes a float32
    ``weight`` [N, K] = ((q - z) * s)^T; everything else is copied as stored."""
    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    quant = config.pop("quantization_config", None) or config.get("llm_config", {}).pop("quantization_config")
    group_size = quant.get("group_size", quant.get("q_group_size"))
    state = load_file(str(src / WEIGHTS_FILE))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            dense = dequantize_awq(tensor, state[f"{base}.qzeros"], state[f"{base}.scales"], group_size,
                                   dtype=torch.float32)
            out[f"{base}.weight"] = dense.t().contiguous()
        elif not name.endswith((".qzeros", ".scales")):
            out[name] = tensor

    def write(tmp: Path) -> None:
        _copy_side_files(src, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(out, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})

    return _write_folder(Path(dst), write)


def edited_copy(src: str | os.PathLike, dst: str | os.PathLike, edit: Callable[[dict], None]) -> Path:
    """Copy of a checkpoint whose config.json dict went through `edit` (weights are hard-linked)."""
    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    edit(config)

    def write(tmp: Path) -> None:
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json":
                os.link(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    return _write_folder(Path(dst), write)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and the like: every file but the weights, config and stamps."""
    for f in src.iterdir():
        if f.is_file() and f.name not in (WEIGHTS_FILE, "config.json", "tiny_build.json", "quant_config.json"):
            shutil.copy2(f, dst / f.name)


def _write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    return write_folder_atomically(out, write)
