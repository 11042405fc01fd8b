"""DiffusionGemma on Apple Silicon with MLX."""

from .errors import UserError
from .generate import GenerationResponse, GenerationSettings, StepEvent, generate, generate_step, stream_generate
from .loading import load, load_model
from .model import Model, ModelArgs

__all__ = [
    "GenerationResponse", "GenerationSettings", "Model", "ModelArgs", "StepEvent", "UserError",
    "generate", "generate_step", "load", "load_model", "stream_generate",
]
__version__ = "0.1.0"
