"""Language models behind one small interface.

``build_catalog(policy.models)`` validates the operator's model catalog and
returns a ``ModelCatalog``; ``catalog.complete(route.models, request,
deadline_s=…)`` calls the chain with retry, fallback and circuit breaking. A user message may carry
images (``ChatMessage.images``, ``ImagePart`` bytes); only models with ``vision: true``
get them (``catalog.vision_models``), each in its provider's format.
Each provider lives in its own module (``adapters.openai``, ``adapters.anthropic``,
``adapters.ernie``, ``adapters.dashscope``, ``adapters.spark``, ``adapters.ollama``,
``adapters.demo``).
"""

from imbot.adapters.base import (
    ChatMessage,
    ChatModel,
    ChatRequest,
    CompletionResult,
    Delta,
    Done,
    ImageMediaType,
    ImagePart,
    StreamEvent,
    UnsupportedInput,
    Usage,
    UsageEvent,
)
from imbot.adapters.catalog import CatalogEntry, ModelCatalog, build_catalog
from imbot.adapters.images import estimate_image_tokens, image_from_bytes, request_image_tokens
from imbot.adapters.resilience import CircuitBreaker, CircuitOpenError
from imbot.core.catalog import ModelConfig, Price
from imbot.core.envelope import FinishReason

__all__ = [
    "CatalogEntry",
    "ChatMessage",
    "ChatModel",
    "ChatRequest",
    "CircuitBreaker",
    "CircuitOpenError",
    "CompletionResult",
    "Delta",
    "Done",
    "FinishReason",
    "ImageMediaType",
    "ImagePart",
    "ModelCatalog",
    "ModelConfig",
    "Price",
    "StreamEvent",
    "UnsupportedInput",
    "Usage",
    "UsageEvent",
    "build_catalog",
    "estimate_image_tokens",
    "image_from_bytes",
    "request_image_tokens",
]
