"""The generation engine: token ids in, token ids out, continuous batching with one adapter per request."""

from .engine import Engine, EngineConfig
from .request import FinishReason, GenerationRequest, RequestOutput, TokenEvent
from .sampling import SamplingParams
from .structured import Constraint, Grammars

__all__ = ["Constraint", "Engine", "EngineConfig", "FinishReason", "GenerationRequest", "Grammars", "RequestOutput",
           "SamplingParams", "TokenEvent"]
