"""Images for vision models: which format the bytes are, and how many input tokens a
provider bills for one (the estimate the route stage reserves before the call).

The estimates follow each provider's published rule; the exact count only comes back
in the provider's usage after the call (images are billed as input tokens everywhere).
Without the image's size (Easemob's ``size`` is optional) each rule's conservative
maximum is used, so a reservation errs on the side of too much:

==========  ===========================================================  ===============
provider    rule (documented)                                            size unknown
==========  ===========================================================  ===============
openai      ``detail: low`` 85; otherwise fit in 2048², shortest side     1445 (8 tiles)
            768, then 85 + 170 per 512-px tile
anthropic   width × height / 750, after fitting the long edge in 1568,   1600
            at most ~1600 per image
dashscope   one token per 28 × 28 pixels, 4 to 1280 per image, plus the  1282
            two vision-marker tokens (qwen-vl; qwen3-vl's 32-px patches
            differ: set ``image_tokens``) [unconfirmed for every model]
ollama      depends on the model's projector (LLaVA 576 per tile, up to  2880
            5 tiles for LLaVA-NeXT); the worst case of the common ones
demo        labelled canned answer; a nominal 85                          85
==========  ===========================================================  ===============

A catalog entry's ``image_tokens`` overrides all of this for that model.
"""

from __future__ import annotations

import math

from imbot.adapters.base import ChatRequest, ImageMediaType, ImagePart, UnsupportedInput
from imbot.core.catalog import (
    AnthropicConfig,
    DashScopeConfig,
    DemoConfig,
    OllamaConfig,
    OpenAIConfig,
    _ModelEntry,
)

OPENAI_LOW_DETAIL = 85
OPENAI_TILE = 170
OPENAI_UNKNOWN = OPENAI_LOW_DETAIL + OPENAI_TILE * 8  # 2048 × 768 at high detail
ANTHROPIC_MAX = 1600
DASHSCOPE_MIN, DASHSCOPE_MAX, DASHSCOPE_MARKERS = 4, 1280, 2
OLLAMA_UNKNOWN = 2880
DEMO_NOMINAL = 85

_MAGIC: tuple[tuple[bytes, ImageMediaType], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff_media_type(data: bytes) -> ImageMediaType | None:
    """The format the bytes are in (by their magic number), or None for anything else."""
    for magic, media_type in _MAGIC:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_from_bytes(
    data: bytes, *, width: int | None = None, height: int | None = None
) -> ImagePart:
    """An ``ImagePart`` for downloaded bytes. The format comes from the bytes, not from a
    Content-Type header (file servers answer ``application/octet-stream``); a format no
    vision provider takes (HEIC from a phone, BMP, …) is ``UnsupportedInput``."""
    media_type = sniff_media_type(data)
    if media_type is None:
        raise UnsupportedInput("image is not JPEG, PNG, GIF or WebP", code="image_format")
    return ImagePart(data=data, media_type=media_type, width=width, height=height)


def openai_image_tokens(width: int | None, height: int | None, *, detail: str = "auto") -> int:
    if detail == "low":
        return OPENAI_LOW_DETAIL
    if width is None or height is None:
        return OPENAI_UNKNOWN
    w, h = float(width), float(height)
    fit = min(1.0, 2048 / max(w, h))
    w, h = w * fit, h * fit
    shrink = min(1.0, 768 / min(w, h))
    w, h = w * shrink, h * shrink
    return OPENAI_LOW_DETAIL + OPENAI_TILE * math.ceil(w / 512) * math.ceil(h / 512)


def anthropic_image_tokens(width: int | None, height: int | None) -> int:
    if width is None or height is None:
        return ANTHROPIC_MAX
    fit = min(1.0, 1568 / max(width, height))
    return min(ANTHROPIC_MAX, math.ceil(width * fit * height * fit / 750))


def dashscope_image_tokens(width: int | None, height: int | None) -> int:
    if width is None or height is None:
        return DASHSCOPE_MAX + DASHSCOPE_MARKERS
    patches = math.ceil(width / 28) * math.ceil(height / 28)
    return min(max(patches, DASHSCOPE_MIN), DASHSCOPE_MAX) + DASHSCOPE_MARKERS


def estimate_image_tokens(config: _ModelEntry, image: ImagePart) -> int:
    """Input tokens one image costs on this model (see the module table); 0 for a model
    that takes no images (it is never sent one)."""
    if config.image_tokens is not None:
        return config.image_tokens
    w, h = image.width, image.height
    if isinstance(config, OpenAIConfig):
        return openai_image_tokens(w, h, detail=config.image_detail)
    if isinstance(config, AnthropicConfig):
        return anthropic_image_tokens(w, h)
    if isinstance(config, DashScopeConfig):
        return dashscope_image_tokens(w, h)
    if isinstance(config, OllamaConfig):
        return OLLAMA_UNKNOWN
    if isinstance(config, DemoConfig):
        return DEMO_NOMINAL
    return 0


def request_image_tokens(config: _ModelEntry, request: ChatRequest) -> int:
    """Input tokens the request's images cost on this model (add the text's estimate)."""
    return sum(estimate_image_tokens(config, image) for image in request.images)
