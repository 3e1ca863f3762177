"""Language models behind one small interface.

``build_catalog(policy.models)`` validates the operator's model catalog and
returns a ``ModelCatalog``; ``catalog.complete(route.models, request,
deadline_s=…)`` calls the chain with retry, fallback and circuit breaking.
Each provider lives in its own module (``adapters.openai``, ``adapters.anthropic``,
``adapters.ernie``, ``adapters.dashscope``, ``adapters.spark``, ``adapters.ollama``,
``adapters.demo``).
"""

from adapters.base import (
    ChatMessage,
    ChatModel,
    ChatRequest,
    CompletionResult,
    Delta,
    Done,
    StreamEvent,
    Usage,
    UsageEvent,
)
from adapters.catalog import CatalogEntry, ModelCatalog, build_catalog
from adapters.config import ModelConfig, Price
from adapters.resilience import CircuitBreaker, CircuitOpenError
from core.envelope import FinishReason

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
    "ModelCatalog",
    "ModelConfig",
    "Price",
    "StreamEvent",
    "Usage",
    "UsageEvent",
    "build_catalog",
]
