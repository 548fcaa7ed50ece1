"""Video input for InternVL2 (tiny InternVL2-40B layout: Llama + InternViT-6B style, pixel shuffle v2) on CPU vLLM.

The oracle is InternVL's own video chat from its model cards: ``load_video(num_segments=N, max_num=1)`` picks
frame ``int(seg / 2 + round(seg * i))`` with ``seg = (T - 1) / N`` (written out here, independently of the
plugin), each frame one 448-px tile, and the question gets one ``Frame{i}: <image>`` line per frame. vLLM's
prompt ids must equal the reference tokenizer's on that prompt (so 6 frames = 6 x 256 image tokens + the
text), greedy tokens equal the plain-PyTorch reference's and prompt logprobs within 1e-4 (float32).
Through LLM.generate with an array and a list of frames, with a per-request num_frames, and through LLM.chat
with an mp4 ``video_url`` that vLLM decodes with OpenCV (its default video loader, installed with it).
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from conftest import make_llm, release_llm
from PIL import Image
from reference import (IMG_CONTEXT_TOKEN, load_reference, ref_build_prompt, ref_load_image,
                       ref_num_image_token_per_tile)

LOGPROB_ATOL = 1e-4
MAX_TOKENS = 6
CLIP = np.random.default_rng(0).integers(0, 256, (6, 96, 128, 3), dtype=np.uint8)  # 6 frames, 128x96


def internvl_frame_indices(total, num_segments):
    seg = (total - 1) / num_segments
    return [int(seg / 2 + np.round(seg * i)) for i in range(num_segments)]


def test_a_v1_model_refuses_video_in_one_line(tiny_model, monkeypatch):
    """InternVL-Chat-V1-5 (pixel shuffle v1) takes no video. First in the file: its engine is gone before the
    module's shared engine starts (in-process engines run one at a time)."""
    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = make_llm(tiny_model("internvl-chat-v1-5"), max_model_len=2048, limit_mm_per_prompt={"image": 1})
    try:
        with pytest.raises(Exception, match=r"^this InternVL model \(pixel shuffle v1, InternVL-Chat-V1-5 style\) "
                                            r"takes images, not video; InternVL2 and 2.5 take video"):
            llm.generate({"prompt": "<video>\nx", "multi_modal_data": {"video": CLIP}}, SamplingParams(max_tokens=2),
                         use_tqdm=False)
        assert len(llm.generate({"prompt": "hello"}, SamplingParams(max_tokens=2, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].token_ids) == 2
    finally:
        release_llm(llm)


@pytest.fixture(scope="module")
def engine(tiny_model, monkeypatch_module):
    from transformers import AutoTokenizer

    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = tiny_model("internvl2-40b")
    llm = make_llm(path, limit_mm_per_prompt={"image": 1, "video": 1})
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    yield llm, load_reference(path), tok, tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    release_llm(llm)


def _sampling():
    from vllm import SamplingParams
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=0)


def _frame_block(config):
    return "<img>" + IMG_CONTEXT_TOKEN * ref_num_image_token_per_tile(config) + "</img>"


def _check(out, model, ids, frames, ctx_id):
    pixel_values = torch.cat([ref_load_image(Image.fromarray(f), 1, model.config) for f in frames])
    assert pixel_values.shape[0] == len(frames)   # one tile per frame
    assert list(out.prompt_token_ids) == ids
    assert ids.count(ctx_id) == len(frames) * ref_num_image_token_per_tile(model.config)
    assert list(out.outputs[0].token_ids) == model.greedy_generate(ids, pixel_values, ctx_id, MAX_TOKENS, None)
    ref_lp = model.prompt_logprobs(ids, pixel_values, ctx_id)
    got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])
    diff = (got - ref_lp).abs().max().item()
    print(f"[{len(frames)} frames, {len(ids)} prompt tokens] max |dlogprob| = {diff:.2e}")
    assert diff < LOGPROB_ATOL


def test_six_frame_clip_is_internvls_video_prompt(engine):
    llm, model, tok, ctx_id = engine
    out = llm.generate({"prompt": "<video>\nDescribe the video.", "multi_modal_data": {"video": CLIP}},
                       _sampling(), use_tqdm=False)[0]
    text = "".join(f"Frame{i + 1}: <image>\n" for i in range(6)) + "Describe the video."
    ids = tok(text.replace("<image>", _frame_block(model.config))).input_ids
    assert len(ids) == 6 * 256 + len(tok(text.replace("<image>", "")).input_ids) + 6 * 2  # + <img></img> a frame
    _check(out, model, ids, list(CLIP), ctx_id)
    # the same clip as a list of PIL frames gives the same prompt and tokens
    again = llm.generate({"prompt": "<video>\nDescribe the video.",
                          "multi_modal_data": {"video": [Image.fromarray(f) for f in CLIP]}}, _sampling(), use_tqdm=False)[0]
    assert list(again.prompt_token_ids) == ids and list(again.outputs[0].token_ids) == list(out.outputs[0].token_ids)


def test_num_frames_per_request_samples_like_internvl(engine):
    llm, model, tok, ctx_id = engine
    picked = internvl_frame_indices(6, 4)
    assert picked == [0, 1, 2, 4]   # np.round: 2.5 rounds to 2
    out = llm.generate({"prompt": "<video>\nDescribe.", "multi_modal_data": {"video": CLIP},
                        "mm_processor_kwargs": {"num_frames": 4}}, _sampling(), use_tqdm=False)[0]
    text = "".join(f"Frame{i + 1}: <image>\n" for i in range(4)) + "Describe."
    _check(out, model, tok(text.replace("<image>", _frame_block(model.config))).input_ids, [CLIP[i] for i in picked],
           ctx_id)
    with pytest.raises(Exception, match="num_frames must be an integer in 1..32, got 0"):
        llm.generate({"prompt": "<video>\nx", "multi_modal_data": {"video": CLIP},
                      "mm_processor_kwargs": {"num_frames": 0}}, _sampling(), use_tqdm=False)


def mp4_bytes(clip: np.ndarray, tmp_path) -> bytes:
    import cv2

    path = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 6, (clip.shape[2], clip.shape[1]))
    for frame in clip:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # OpenCV writes BGR
    writer.release()
    return open(path, "rb").read()


def decoded_frames(data: bytes, tmp_path) -> list[np.ndarray]:
    import cv2

    path = str(tmp_path / "decoded.mp4")
    open(path, "wb").write(data)
    cap, frames = cv2.VideoCapture(path), []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(frame[:, :, ::-1].copy())


def test_chat_with_an_mp4_video_url(engine, tmp_path):
    llm, model, tok, ctx_id = engine
    data = mp4_bytes(CLIP, tmp_path)
    frames = decoded_frames(data, tmp_path)   # lossy codec: the reference sees what OpenCV decodes
    assert len(frames) == 6
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    out = llm.chat([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                 {"type": "text", "text": "What happens?"}]}], _sampling(), use_tqdm=False)[0]
    question = "".join(f"Frame{i + 1}: <image>\n" for i in range(6)) + "What happens?"
    _check(out, model, tok(ref_build_prompt(question, [1] * 6, model.config)).input_ids, frames, ctx_id)
