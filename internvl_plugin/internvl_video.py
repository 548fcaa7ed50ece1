"""InternVL2 / 2.5 video input as InternVL's own chat does it: sampled frames, one tile each, numbered.

InternVL's model cards load a video with ``load_video(path, num_segments=8, max_num=1)``: ``num_segments``
frames at the middle of equal segments (``get_index``), each cut to ``max_num`` = 1 tile, and the question
is prefixed with one ``Frame{i}: <image>`` line per frame; every ``<image>`` then becomes
``<img>`` + 256 ``<IMG_CONTEXT>`` + ``</img>`` (spec internvl-and-quant A3.4). The plugin takes the video
as frames (a list of images or arrays, or a [T, H, W, C] array, as vLLM hands it over after decoding a
``video_url`` with OpenCV) under the ``<video>`` placeholder and expands it to those lines.

Frames: ``num_frames`` (mm_processor_kwargs, 1..MAX_FRAMES) samples that many with InternVL's rule;
without it a clip of at most DEFAULT_NUM_FRAMES frames is used as given, a longer one is sampled down
to DEFAULT_NUM_FRAMES. Written by hand because InternVL's helpers need decord and torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["DEFAULT_NUM_FRAMES", "MAX_FRAMES", "VIDEO_PLACEHOLDER", "frame_indices", "frame_prefix",
           "num_video_frames", "video_frames"]

VIDEO_PLACEHOLDER = "<video>"
DEFAULT_NUM_FRAMES = 8     # InternVL's model cards (num_segments=8)
MAX_FRAMES = 32            # InternVL2's video evaluations sample at most 32


def frame_indices(total: int, num_frames: int) -> list[int]:
    """InternVL's ``get_index`` without time bounds: the middle of ``num_frames`` equal segments of
    frames 0..total-1 (repeats frames when the clip is shorter than ``num_frames``)."""
    if total < 1:
        raise ValueError("the video has no frames")
    last = total - 1
    segment = last / num_frames
    return [int(segment / 2 + np.round(segment * i)) for i in range(num_frames)]


def num_video_frames(total: int, num_frames: object | None) -> int:
    """Frames the model sees for a clip of ``total`` frames and a request's ``num_frames`` (or None)."""
    if num_frames is None:
        return min(total, DEFAULT_NUM_FRAMES)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_FRAMES:
        raise ValueError(f"num_frames must be an integer in 1..{MAX_FRAMES}, got {num_frames!r}")
    return num_frames


def video_frames(video: object, num_frames: object | None = None) -> list[Image.Image]:
    """The sampled frames of one video as RGB PIL images."""
    frames = _as_frame_list(video)
    count = num_video_frames(len(frames), num_frames)
    if num_frames is None and count == len(frames):
        picked = frames
    else:
        picked = [frames[i] for i in frame_indices(len(frames), count)]
    return [_frame_to_pil(f) for f in picked]


def frame_prefix(i: int) -> str:
    """Text before the i-th frame's image block (1-based), as InternVL writes it."""
    return f"Frame{i}: "


def _as_frame_list(video: object) -> Sequence[object]:
    if isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], dict):
        video = video[0]   # (frames, metadata) as vLLM's video loader returns them
    if isinstance(video, torch.Tensor):
        video = video.numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"a video array must be [frames, height, width, channels], got shape {list(video.shape)}")
        return list(video)
    if isinstance(video, (list, tuple)) and video:
        return list(video)
    raise ValueError(f"a video must be a non-empty list of frames or a 4-D array, got {type(video).__name__}")


def _frame_to_pil(frame: object) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    array = frame.numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"a video frame must be an image or an [H, W, C] array, got shape {list(array.shape)}")
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert("RGB")
