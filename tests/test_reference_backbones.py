"""The reference's Llama and Phi-3 decoders (tests/reference/llm.py) against transformers' own.

Same random weights in both, float32, eager attention: logits must agree to float32 noise. Phi-3 is
checked with LongRoPE on both sides of ``original_max_position_embeddings`` (short and long factors)
and with the legacy ``"su"`` spelling that Mini-InternVL-Chat-4B-V1-5's config carries; Llama with
grouped-query attention and Yi's rope_theta. The tiny layouts' own checkpoints load into the reference
with every weight name accounted for.
"""

from __future__ import annotations

import pytest
import torch
from reference import load_reference
from reference.llm import build_language_model

ATOL = 1e-5


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)


def _compare(hf_model, llm_config, length, seed=1):
    ref = build_language_model(llm_config)
    missing, unexpected = ref.load_state_dict(hf_model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ids = torch.randint(0, llm_config["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf_model(ids[None]).logits[0]
        got = ref(ids)
    assert expected.std() > 0.5, "logits too flat to compare"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)
    return got


PHI3 = dict(architectures=["Phi3ForCausalLM"], vocab_size=150, hidden_size=192, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_theta=10000.0, max_position_embeddings=256, original_max_position_embeddings=16,
            sliding_window=4096, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
            pad_token_id=2)


def _phi3_scaling(kind):
    half = 48
    if kind == "default":
        return None
    return {"type" if kind == "su" else "rope_type": kind,
            "short_factor": [1.0 + 0.5 * i / half for i in range(half)],
            "long_factor": [1.0 + 8.0 * (i / half) ** 2 for i in range(half)]}


@pytest.mark.parametrize("kind,length", [("default", 23), ("longrope", 12), ("longrope", 40), ("su", 40)])
def test_phi3_decoder_matches_transformers(kind, length):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = dict(PHI3, rope_scaling=_phi3_scaling(kind))
    hf_cfg = dict(cfg)
    if kind == "su":  # what internvl_plugin.configs does for the legacy spelling transformers 5.19 refuses
        hf_cfg["rope_scaling"] = dict(_phi3_scaling("longrope"))
    hf_config = Phi3Config(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    hf = Phi3ForCausalLM(hf_config).eval()
    _randomize(hf, 0)
    got = _compare(hf, cfg, length)
    if kind != "default":  # the rope variant matters: plain rope gives other logits
        plain = build_language_model(dict(cfg, rope_scaling=None))
        plain.load_state_dict(hf.state_dict(), strict=False)
        ids = torch.randint(0, cfg["vocab_size"], (length,), generator=torch.Generator().manual_seed(1))
        assert (plain(ids) - got).abs().max() > 1e-2


def test_llama_decoder_matches_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=150, hidden_size=128, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
               rope_theta=5000000.0, max_position_embeddings=512, tie_word_embeddings=False, hidden_act="silu",
               attention_bias=False, mlp_bias=False)
    hf_config = LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_config).eval()
    _randomize(hf, 2)
    _compare(hf, cfg, 29)


LAYOUT_FACTS = {
    # layout: (reference class, weight names that must be there, names that must not, llm_config facts)
    "mini-internvl-4b": ("Phi3ForCausalLMRef",
                         ["language_model.model.layers.1.self_attn.qkv_proj.weight",
                          "language_model.model.layers.0.mlp.gate_up_proj.weight", "language_model.lm_head.weight"],
                         ["language_model.model.layers.0.self_attn.q_proj.weight"],
                         {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 192,
                          "num_attention_heads": 2, "num_key_value_heads": 2, "original_max_position_embeddings": 4096,
                          "max_position_embeddings": 131072, "sliding_window": 262144}),
    "internvl2-40b": ("LlamaForCausalLMRef",
                      ["language_model.model.layers.1.self_attn.k_proj.weight",
                       "language_model.model.layers.0.mlp.gate_proj.weight", "language_model.lm_head.weight"],
                      ["language_model.model.layers.0.self_attn.q_proj.bias"],
                      {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 5000000.0,
                       "num_attention_heads": 4, "num_key_value_heads": 1, "attention_bias": False}),
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_FACTS))
def test_tiny_layout_is_real_and_loads_into_the_reference(tiny_model, layout):
    """Real config keys, weight names and tokenizer layout; every checkpoint tensor has its place in the
    reference and none is missing (load_reference is strict)."""
    import json

    from safetensors import safe_open
    from transformers import AutoTokenizer

    path = tiny_model(layout)
    ref_cls, present, absent, llm_facts = LAYOUT_FACTS[layout]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["ps_version"] == "v2" and cfg["template"] == {"mini-internvl-4b": "phi3-chat",
                                                               "internvl2-40b": "Hermes-2"}[layout]
    assert cfg["vision_config"]["qk_normalization"] == (layout == "internvl2-40b")   # InternViT-6B style for 40B
    for key, value in llm_facts.items():
        assert cfg["llm_config"][key] == value, key
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert set(present) <= names and not set(absent) & names

    tok = AutoTokenizer.from_pretrained(str(path))
    text = "<|user|>\nhi<|end|>" if layout == "mini-internvl-4b" else "<|im_start|>user\nhi<|im_end|>"
    ids = tok(text).input_ids
    if layout == "mini-internvl-4b":   # Llama-2 sentencepiece: <s> = 1 added; Phi-3's chat tokens one id each
        assert tok.convert_ids_to_tokens(ids[:2]) == ["<s>", "<|user|>"] and "<|end|>" in tok.convert_ids_to_tokens(ids)
        assert cfg["llm_config"]["eos_token_id"] == tok.convert_tokens_to_ids("<|end|>")
        assert cfg["llm_config"]["rope_scaling"]["type"] == "su"
    else:                              # Yi: <|startoftext|> = 1 never added, ChatML tokens are pieces of the model
        assert tok.convert_tokens_to_ids(["<unk>", "<|startoftext|>", "<|endoftext|>"]) == [0, 1, 2]
        assert tok.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"] and tok.convert_tokens_to_ids("<|im_start|>") < 10
        assert cfg["llm_config"]["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
        assert not tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|startoftext|>")
    assert len(tok) == cfg["llm_config"]["vocab_size"]

    ref = load_reference(path)
    assert type(ref.language_model).__name__ == ref_cls
