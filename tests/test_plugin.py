"""Plugin discovery and registration: entry point, every vLLM process, no remote code anywhere."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_is_declared_and_loads():
    eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "internvl"]
    assert len(eps) == 1 and eps[0].value == "internvl_plugin:register"
    register = eps[0].load()
    register()
    register()  # idempotent

    from vllm import ModelRegistry

    assert "InternVLChatModel" in ModelRegistry.get_supported_archs()
    from vllm.model_executor.models.registry import _LazyRegisteredModel

    entry = ModelRegistry.models["InternVLChatModel"]
    assert isinstance(entry, _LazyRegisteredModel)  # lazy: registering imports no model code
    assert (entry.module_name, entry.class_name) == ("internvl_plugin.internvl", "InternVLChatModel")


def test_register_is_cheap():
    code = ("import sys, time; t=time.time(); import internvl_plugin; internvl_plugin.register(); "
            "print(time.time()-t, 'internvl_plugin.internvl' in sys.modules, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"], out  # model module not imported; torchvision never


def test_discovered_in_engine_processes_without_vllm_plugins(tiny_model):
    """Default multi-process mode: front-end, engine core and worker are separate processes; the
    worker can only build our class if register() ran there, found through the entry point."""
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests/scripts"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests/scripts/multiprocess_probe.py"),
                           str(tiny_model("internvl2-2b"))], capture_output=True, text=True, env=env, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    probe = json.loads(line[len("PROBE "):])
    (worker,) = probe["workers"]
    assert worker["class"] == "internvl_plugin.internvl:InternVLChatModel"
    assert worker["pid"] != probe["front_pid"]
    assert worker["torchvision_loaded"] is False
    assert worker["vision_dtype"] == "torch.bfloat16"
    assert probe["trust_remote_code"] is False
    assert probe["prompt_len"] > 256 and len(probe["tokens"]) == 4


def test_real_layout_needs_plugin_not_remote_code(tiny_model):
    """Without registration transformers refuses the auto_map configs; with it they load, with
    trust_remote_code=False, and nothing is imported from the checkpoint folder."""
    path = tiny_model("internvl2-2b")
    assert json.loads((path / "config.json").read_text())["auto_map"]  # real checkpoints carry it
    assert not list(path.glob("*.py"))
    bare = ("from transformers import AutoConfig; AutoConfig.from_pretrained(%r, trust_remote_code=False)" % str(path))
    r = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True)
    assert r.returncode != 0 and "trust_remote_code" in r.stderr
    ok = ("import internvl_plugin; internvl_plugin.register(); from transformers import AutoConfig, AutoTokenizer; "
          "c = AutoConfig.from_pretrained(%r, trust_remote_code=False); "
          "t = AutoTokenizer.from_pretrained(%r, trust_remote_code=False); "
          "print(type(c).__module__, type(t).__name__, type(c.llm_config).__name__)" % (str(path), str(path)))
    r = subprocess.run([sys.executable, "-c", ok], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["internvl_plugin.configs", "InternLM2Tokenizer", "InternLM2Config"]


def test_no_trust_remote_code_true_in_project():
    # setting it, in code or in a config/kwargs dict (rejecting a user's flag is fine)
    pattern = re.compile(r"""trust_remote_code["']?\s*[=:]\s*True""")
    offenders = []
    for folder in ("internvl_plugin", "hub_cli", "awq_tools", "kernels"):
        for f in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []


def test_chat_template_fallback_reads_config_template(tiny_model, tmp_path):
    from internvl_plugin.chat_templates import fallback_for_model, template_path

    assert fallback_for_model(str(tiny_model("internvl2-1b"))) == template_path("Hermes-2")
    assert fallback_for_model(str(tiny_model("internvl-chat-v1-5"))) == template_path("internlm2-chat")
    assert fallback_for_model(str(tmp_path)) is None                    # no config.json
    (tmp_path / "config.json").write_text("{not json")
    assert fallback_for_model(str(tmp_path)) is None


def test_hermes2_fallback_starts_without_bos():
    """InternVL's Hermes-2 prompt starts at <|im_start|>: a Yi tokenizer's <|startoftext|> BOS must not be
    prepended by the fallback template (vLLM tokenizes a rendered chat without special tokens)."""
    import jinja2

    from internvl_plugin.chat_templates import template_path

    text = jinja2.Environment().from_string(template_path("Hermes-2").read_text()).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True, bos_token="<|startoftext|>")
    assert text.startswith("<|im_start|>system\n") and "<|startoftext|>" not in text
    assert text.endswith("<|im_start|>user\nhi<|im_end|><|im_start|>assistant\n")


@pytest.mark.parametrize("layout", ["internlm2"])
def test_text_only_internlm2_runs_without_remote_code(tiny_model, layout, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from conftest import make_llm, release_llm
    from vllm import SamplingParams

    llm = make_llm(tiny_model(layout), limit_mm_per_prompt=None)
    try:
        assert llm.llm_engine.model_config.trust_remote_code is False
        out = llm.chat([{"role": "user", "content": "hello"}],
                       SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)[0]
        # For top-level model_type "internlm2" vLLM 0.32 bypasses AutoTokenizer and converts
        # tokenizer.model into a generic fast tokenizer; it must agree with the InternLM2Tokenizer we
        # register (which InternVL checkpoints use directly), special tokens and chat prompt included.
        from transformers import AutoTokenizer

        ours = AutoTokenizer.from_pretrained(str(tiny_model(layout)), trust_remote_code=False)
        assert type(ours).__name__ == "InternLM2Tokenizer"
        tok = llm.get_tokenizer()
        for text in ("hello world", "two  spaces\nnew line", "请描述这张图片。", "The sky is blue. 3.14",
                     "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"):
            assert tok.encode(text) == ours.encode(text), text
        prompt = ours.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                          add_generation_prompt=True)
        assert list(out.prompt_token_ids) == ours(prompt, add_special_tokens=False).input_ids
        assert out.prompt_token_ids[0] == ours.bos_token_id and out.prompt_token_ids.count(ours.bos_token_id) == 1
        assert len(out.outputs[0].token_ids) == 5
    finally:
        release_llm(llm)


def test_processor_hooks_exist_in_vllm():
    """internvl.py overrides BaseMultiModalProcessor._apply_prompt_updates and calls three more
    protected helpers (vLLM 0.32). If vLLM renames them, the override would silently stop applying."""
    import inspect

    from vllm.multimodal.processing import BaseMultiModalProcessor

    from internvl_plugin.internvl import InternVLMultiModalProcessor

    expected = {"_apply_prompt_updates": ["self", "token_ids", "mm_prompt_updates"],
                "_apply_prompt_updates_via_text": ["self", "token_ids", "mm_prompt_updates", "encode_segments_separately"],
                "_find_mm_placeholders": ["self", "new_token_ids", "mm_prompt_updates"],
                "_matched_updates_from_result": ["self", "mm_prompt_updates", "match_result"],
                "_call_hf_processor": ["self", "hf_data", "hf_kwargs"]}
    for name, params in expected.items():
        assert list(inspect.signature(getattr(BaseMultiModalProcessor, name)).parameters) == params, name
    assert InternVLMultiModalProcessor._apply_prompt_updates is not BaseMultiModalProcessor._apply_prompt_updates


def test_processing_info_hook_exists_in_vllm():
    """internvl.py overrides BaseProcessingInfo.validate_num_items (vLLM 0.32) to refuse video on
    pixel-shuffle-v1 models in one line; if vLLM renames it or stops calling it on each request's items,
    the override would silently stop applying."""
    import inspect

    from vllm.multimodal.processing import BaseProcessingInfo, context

    from internvl_plugin.internvl import InternVLProcessingInfo

    assert list(inspect.signature(BaseProcessingInfo.validate_num_items).parameters) == ["self", "modality", "num_items"]
    assert InternVLProcessingInfo.validate_num_items is not BaseProcessingInfo.validate_num_items
    assert "self.validate_num_items(modality, len(items))" in inspect.getsource(context)
