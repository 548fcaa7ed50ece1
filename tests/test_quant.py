"""The W4A16 method ``awq_w4a16`` through real vLLM on CPU.

Tiny InternVL checkpoints are RTN-quantized to AWQ gemm (tests/quant_helpers.py) in the layouts
of our tools, LMDeploy and AutoAWQ, and loaded with a plain ``LLM(path)``. vLLM (float32) is held
against the plain-PyTorch reference built from the *dequantized* weights: both compute
x @ ((q - z) * s) in float32, so greedy tokens must be identical and prompt logprobs agree to
float32 summation-order noise (LOGPROB_ATOL, the engine tests' tolerance).
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import make_llm, random_image, release_llm
from quant_helpers import edited_copy
from reference import (IMG_CONTEXT_TOKEN, load_reference, ref_load_image, ref_num_image_token_per_tile,
                       ref_num_image_tokens)

from internvl_kernels import dequantize_awq
from internvl_plugin.quant import KV_CACHE_HINT, METHOD_NAME, AWQW4A16Config, check_kv_cache_dtype

LOGPROB_ATOL = 1e-4  # float32; measured at most 1.24e-5 over the four layouts
MAX_TOKENS = 8

# (tiny layout, producer layout, group size): InternLM2 and Qwen2 backbones, g = 32 / 64 / 128.
CASES = [
    ("internvl2-2b", "ours", 32),
    ("internvl2-1b", "ours", 64),
    ("internvl2-2b", "lmdeploy", 128),
    ("internvl2-1b", "autoawq", 128),
]


class _Recorder(logging.Filter):
    """Records what a logger emits. A filter, not a handler: vLLM re-applies its logging dictConfig
    when an engine starts, which strips the handlers (but not the filters) of its child loggers."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record):
        self.messages.append(record.getMessage())
        return True


# Installed at import (collection), before any engine of the session: the hint is logged once per
# process, by whichever engine is built first.
QUANT_LOG = _Recorder()
logging.getLogger(f"vllm.{AWQW4A16Config.__module__}").addFilter(QUANT_LOG)


IMAGE = random_image(640, 480, 1)


@pytest.fixture(scope="module", params=CASES, ids=["-".join(map(str, c)) for c in CASES])
def awq_engine(request, awq_model, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    quant, dense = awq_model(*request.param)
    llm = make_llm(quant, limit_mm_per_prompt={"image": 1})  # no --quantization: the checkpoint decides
    yield request.param, quant, dense, llm
    release_llm(llm)


@pytest.fixture(scope="module")
def reference(awq_engine):
    from transformers import AutoTokenizer

    _, quant, dense, _ = awq_engine
    tok = AutoTokenizer.from_pretrained(str(quant), trust_remote_code=False)
    return load_reference(dense), tok, tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)


# ---------------------------------------------------------------------------- errors
# These build (failing) engines of their own, so they stand before the tests that share the
# module's engines: pytest runs them first, while no other in-process engine is alive.


BAD_CONFIGS = [
    ("bits", 8, r"quantization_config\.bits=8 is not supported"),
    ("version", "gemv", r"quantization_config\.version='gemv' is not supported"),
    ("group_size", 96, r"quantization_config\.group_size=96 does not divide the language model's hidden_size=128"),
    ("zero_point", False, r"quantization_config\.zero_point=False is not supported"),
]


@pytest.mark.parametrize("field,value,message", BAD_CONFIGS, ids=[f"{b[0]}={b[1]}" for b in BAD_CONFIGS])
def test_bad_quant_config_is_one_clear_line(awq_model, tmp_path, monkeypatch, field, value, message):
    """Refused in the front end, before any engine process or weight is touched."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    quant, _ = awq_model("internvl2-2b", "ours", 32)
    bad = edited_copy(quant, tmp_path / "bad", lambda config: config["quantization_config"].update({field: value}))
    with pytest.raises(ValueError) as info:  # vLLM wraps it in a pydantic ValidationError (a ValueError)
        make_llm(bad)
    assert re.search(rf"(^|\n|, ){METHOD_NAME}: {message}[^\n]*", str(info.value)), str(info.value)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_per_token_head"])
def test_unsupported_kv_cache_dtype_is_refused(awq_model, monkeypatch, kv_cache_dtype):
    """vLLM builds a CPU engine with a KV dtype its CPU attention does not implement (it computes
    int8_per_token_head wrongly, hence the plugin's backend for int8/int4); the method refuses one that the
    backend in use (the plugin's, test_kv_cpu_format.py) does not list."""
    from vllm.distributed import cleanup_dist_env_and_memory

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    quant, _ = awq_model("internvl2-2b", "ours", 32)
    try:
        with pytest.raises(ValueError, match=rf"^{METHOD_NAME}: --kv-cache-dtype {kv_cache_dtype} is not "
                                             r"implemented by the CPU_ATTN attention backend in use "
                                             r"\(it implements: auto, fp8, fp8_e4m3, fp8_e5m2, "
                                             r"int8_per_token_head, int4_per_token_head\)$"):
            make_llm(quant, kv_cache_dtype=kv_cache_dtype)
    finally:
        cleanup_dist_env_and_memory()


# ---------------------------------------------------------------------------- chosen method, skips


def _linear_methods(model):
    """{module path: quant method class} for every linear and embedding of the model (runs in the worker)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (LinearBase, VocabParallelEmbedding)):
            found[name] = type(module.quant_method).__name__
        elif isinstance(module, torch.nn.Linear):
            found[name] = f"nn.Linear/{module.weight.dtype}"
    return found


def test_checkpoint_selects_our_method(awq_engine):
    _, _, _, llm = awq_engine
    assert llm.llm_engine.model_config.quantization == METHOD_NAME
    (methods,) = llm.apply_model(_linear_methods)
    decoder = {k: v for k, v in methods.items() if k.startswith("language_model.model.layers.")}
    other = {k: v for k, v in methods.items() if k not in decoder}
    # 2 layers x (qkv, o, gate_up, down), all W4A16
    assert len(decoder) == 8 and set(decoder.values()) == {"AWQW4A16LinearMethod"}, decoder
    vision = [k for k in other if k.startswith("vision_model.")]
    assert len(vision) == 8 and all(other[k] == "UnquantizedLinearMethod" for k in vision), other
    assert other["mlp1.1"] == other["mlp1.3"] == "nn.Linear/torch.float32"
    embeddings = [k for k in other if k.startswith("language_model.")]  # token embedding and LM head
    assert len(embeddings) == 2 and all(other[k] == "UnquantizedEmbeddingMethod" for k in embeddings), other
    assert set(other) == set(vision) | set(embeddings) | {"mlp1.1", "mlp1.3"}


def _fused_layers(model):
    layer = model.language_model.model.layers[0]
    if hasattr(layer, "attention"):  # InternLM2: wqkv is stored fused; w1/w3 -> gate_up_proj
        return {"qkv": layer.attention.wqkv, "gate_up": layer.feed_forward.gate_up_proj,
                "down": layer.feed_forward.w2}
    return {"qkv": layer.self_attn.qkv_proj, "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}


def test_fused_shards_load_and_apply(awq_engine):
    """qkv / gate_up shards land side by side in the packed tensors (repacked after loading for the CPU
    int4 kernel, so checked through apply()); apply() equals the reference matmul."""
    from safetensors.torch import load_file

    (layout, _, group_size), quant, _, llm = awq_engine
    state = load_file(str(quant / "model.safetensors"))
    p = "language_model.model.layers.0."
    if layout == "internvl2-2b":
        shards = {"qkv": [p + "attention.wqkv"], "gate_up": [p + "feed_forward.w1", p + "feed_forward.w3"],
                  "down": [p + "feed_forward.w2"]}
    else:
        shards = {"qkv": [p + f"self_attn.{n}_proj" for n in "qkv"],
                  "gate_up": [p + "mlp.gate_proj", p + "mlp.up_proj"], "down": [p + "mlp.down_proj"]}
    x = torch.randn(5, 3, 256, generator=torch.Generator().manual_seed(0))

    def inspect(model):
        out = {}
        for key, layer in _fused_layers(model).items():
            k = layer.input_size_per_partition
            y, bias = layer(x[..., :k])
            out[key] = {"plan": getattr(layer, "cpu_int4_plan", None), "y": y if bias is None else y + bias}
            out[key]["bias"] = None if getattr(layer, "bias", None) is None else layer.bias.detach().clone()
        return out

    (got,) = llm.apply_model(inspect)
    for key, names in shards.items():
        want = {t: torch.cat([state[f"{n}.{t}"] for n in names], dim=1) for t in ("qweight", "qzeros", "scales")}
        assert got[key]["plan"] == "int4pack", key  # float32: PyTorch's int4 kernel, exact dequantization
        k, n = want["qweight"].shape[0], want["scales"].shape[1]
        assert got[key]["y"].shape == (5, 3, n)
        dense = dequantize_awq(want["qweight"], want["qzeros"], want["scales"], group_size, dtype=torch.float32)
        expected = x[..., :k] @ dense
        if got[key]["bias"] is not None:
            expected = expected + got[key]["bias"]
        torch.testing.assert_close(got[key]["y"], expected, rtol=1e-5, atol=1e-5)


def _create_weights_probe(model):
    """create_weights / process_weights_after_loading / apply on a bare fused layer (runs in the worker,
    where vLLM's parallel state exists)."""
    from internvl_kernels import quantize_awq, w4a16_matmul_ref
    from internvl_plugin.quant_linear import AWQW4A16LinearMethod

    method = AWQW4A16LinearMethod(AWQW4A16Config(32))
    layer = torch.nn.Module()
    sizes = [128, 64, 64]  # q, k, v
    method.create_weights(layer, 96, sizes, 96, sum(sizes), torch.float32, weight_loader=None)
    shapes = {n: (tuple(p.shape), p.dtype, getattr(p, "packed_dim", None)) for n, p in layer.named_parameters()}
    qweight, qzeros, scales = quantize_awq(torch.randn(sum(sizes), 96, generator=torch.Generator().manual_seed(1)), 32)
    for name, value in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        getattr(layer, name).data.copy_(value)
    method.process_weights_after_loading(layer)
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(2))
    y = method.apply(layer, x)
    errors = []
    for in_size, out_sizes in ((80, [64]), (96, [128, 12])):
        try:
            method.create_weights(torch.nn.Module(), in_size, out_sizes, in_size, sum(out_sizes), torch.float32,
                                  weight_loader=None)
        except ValueError as e:
            errors.append(str(e))
    return {"shapes": shapes, "types": {n: type(p).__name__ for n, p in layer.named_parameters()},
            "y": y, "expected": w4a16_matmul_ref(x, qweight, qzeros, scales, 32), "errors": errors}


def test_create_weights_shapes_and_apply(awq_engine):
    _, _, _, llm = awq_engine
    (got,) = llm.apply_model(_create_weights_probe)
    assert got["shapes"] == {"qweight": ((96, 32), torch.int32, 1), "qzeros": ((3, 32), torch.int32, 1),
                             "scales": ((3, 256), torch.float32, None)}
    assert set(got["types"].values()) == {"Parameter"}  # plain Parameters after loading
    assert got["y"].shape == (2, 7, 256)
    # the CPU int4 kernel dequantizes exactly in float32: only the summation order differs
    torch.testing.assert_close(got["y"], got["expected"], rtol=1e-5, atol=1e-5)
    assert got["errors"] == [
        f"{METHOD_NAME}: quantization_config.group_size=32 does not divide the 80 input features of Module",
        f"{METHOD_NAME}: output sizes [128, 12] of Module must be multiples of 8 to hold packed 4-bit weights",
    ]


# ---------------------------------------------------------------------------- vs the reference


def _sampling():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=0)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_generate_matches_dequantized_reference(awq_engine, reference, with_image):
    case, _, _, llm = awq_engine
    model, tok, ctx_id = reference
    prompt = ("<image>\n" if with_image else "") + "Describe the image in detail."
    request = {"prompt": prompt}
    pixel_values = None
    if with_image:
        request["multi_modal_data"] = {"image": IMAGE}
        pixel_values = ref_load_image(IMAGE, None, model.config)
        n = ref_num_image_tokens(IMAGE.width, IMAGE.height, None, model.config)
        assert n % ref_num_image_token_per_tile(model.config) == 0
        prompt = prompt.replace("<image>", "<img>" + IMG_CONTEXT_TOKEN * n + "</img>", 1)
    ids = tok(prompt).input_ids
    out = llm.generate(request, _sampling(), use_tqdm=False)[0]

    assert list(out.prompt_token_ids) == ids
    assert list(out.outputs[0].token_ids) == model.greedy_generate(ids, pixel_values, ctx_id, MAX_TOKENS, None)
    ref_lp = model.prompt_logprobs(ids, pixel_values, ctx_id)
    got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])
    diff = (got - ref_lp).abs().max().item()
    print(f"max |dlogprob| {case} image={with_image}: {diff:.2e}")
    assert diff < LOGPROB_ATOL, f"max |dlogprob| {diff:.2e}"


def test_quantization_changes_the_model(awq_engine, tiny_model):
    """Guard against a vacuous comparison: the 4-bit weights really differ from the originals."""
    from safetensors.torch import load_file

    (layout, _, _), _, dense, _ = awq_engine
    original = load_file(str(tiny_model(layout) / "model.safetensors"))
    deq = load_file(str(dense / "model.safetensors"))
    name = next(k for k in deq if k.endswith(("wqkv.weight", "q_proj.weight")))
    err = (deq[name] - original[name].float()).abs()
    # RTN 4-bit on Gaussian weights: mean |error| ~ step/4 ~ 0.1 x mean |w| at g=128, less at g=32
    assert 0 < err.mean().item() < 0.2 * original[name].float().abs().mean().item()


def test_kv_cache_hint_logged_once(awq_engine):
    assert QUANT_LOG.messages.count(KV_CACHE_HINT) == 1
    # and it goes somewhere: the "vllm" logger tree has vLLM's handler at INFO
    quant_logger = logging.getLogger(f"vllm.{AWQW4A16Config.__module__}")
    assert quant_logger.isEnabledFor(logging.INFO) and logging.getLogger("vllm").handlers
    assert "--kv-cache-dtype int4_per_token_head" in KV_CACHE_HINT


# ---------------------------------------------------------------------------- config unit tests


def test_from_config_accepts_every_producer():
    lmdeploy = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}
    autoawq = {"quant_method": "awq", "zero_point": True, "group_size": 64, "bits": 4, "version": "gemm",
               "modules_to_not_convert": None}
    autoawq_file = {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM",
                    "modules_to_not_convert": ["vision_model"]}
    assert AWQW4A16Config.from_config(lmdeploy).group_size == 128
    assert AWQW4A16Config.from_config(autoawq).modules_to_not_convert == []
    cfg = AWQW4A16Config.from_config(autoawq_file)
    assert (cfg.group_size, cfg.modules_to_not_convert) == (32, ["vision_model"])


@pytest.mark.parametrize("edit,message", [
    ({"bits": 3}, "bits=3"), ({"version": "gemv_fast"}, "version='gemv_fast'"), ({"group_size": -1}, "group_size=-1"),
    ({"zero_point": False}, "zero_point=False"), ({"lm_head": True}, "lm_head=true"),
    ({"modules_to_not_convert": "vision_model"}, "modules_to_not_convert='vision_model'"),
])
def test_from_config_rejects_with_one_line(edit, message):
    config = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True, **edit}
    with pytest.raises(ValueError) as info:
        AWQW4A16Config.from_config(config)
    text = str(info.value)
    assert text.startswith(f"{METHOD_NAME}: quantization_config.{message}") and "\n" not in text


class _Cfg:
    def __init__(self, *archs):
        self.architectures = list(archs)


@pytest.mark.parametrize("arch,user,quant_method,expected", [
    ("InternVLChatModel", None, "awq", METHOD_NAME),
    ("InternVLChatModel", None, "AWQ", METHOD_NAME),
    ("InternLM2ForCausalLM", None, "awq", METHOD_NAME),
    ("InternVLChatModel", METHOD_NAME, "awq", METHOD_NAME),
    ("InternVLChatModel", "awq", "awq", None),  # an explicit --quantization awq keeps vLLM's own
    ("InternVLChatModel", None, "gptq", None),
    ("LlamaForCausalLM", None, "awq", None),  # models this plugin does not serve keep vLLM's AWQ
])
def test_override_claims_only_our_models(arch, user, quant_method, expected):
    assert AWQW4A16Config.override_quantization_method({"quant_method": quant_method}, user, _Cfg(arch)) == expected


def test_skip_rules():
    cfg = AWQW4A16Config(128, ["vision_model", "mlp1", "language_model.model.layers.1.mlp.gate_proj",
                               "language_model.model.layers.1.mlp.up_proj"])
    cfg.packed_modules_mapping.update({"gate_up_proj": ["gate_proj", "up_proj"],
                                       "qkv_proj": ["q_proj", "k_proj", "v_proj"]})
    quantized = ["language_model.model.layers.0.attention.wqkv", "language_model.model.layers.11.mlp.down_proj",
                 "language_model.model.layers.0.mlp.gate_up_proj", "model.layers.3.self_attn.qkv_proj"]
    kept = ["vision_model.encoder.layers.0.attn.qkv", "mlp1.1", "language_model.output", "language_model.lm_head",
            "language_model.model.layers.1.mlp.gate_up_proj",  # both shards listed
            "model.layers.0.attention.wqkv.Plora_A", "model.layers.0.feed_forward.w2.Plora_B",
            "vit.vision_tower.vision_model.encoder.layers.0.mlp.fc1", "vision_proj.0"]
    assert [p for p in quantized if not cfg.is_quantized_module(p)] == []
    assert [p for p in kept if cfg.is_quantized_module(p)] == []


def test_kv_dtype_check_follows_the_backend():
    """Whatever the backend implements passes: fp8 on vLLM's CPU backend, int4_per_token_head on one
    that declares it (as the plugin's CPU KV4 backend will)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    class KV4Backend(CPUAttentionBackend):
        supported_kv_cache_dtypes = [*CPUAttentionBackend.supported_kv_cache_dtypes, "int4_per_token_head"]

    check_kv_cache_dtype("fp8", CPUAttentionBackend)
    check_kv_cache_dtype("int4_per_token_head", KV4Backend)
    with pytest.raises(ValueError, match="int4_per_token_head is not implemented by the CPU_ATTN"):
        check_kv_cache_dtype("int4_per_token_head", CPUAttentionBackend)
