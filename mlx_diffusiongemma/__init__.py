"""DiffusionGemma on Apple Silicon with MLX.

Where things live: `models/` (the model, its config and caches), `sample.py` (the sampler
as pure functions), `generate.py` (`generate_step` -> `stream_generate` -> `generate`; one canvas's
denoising loop in `steps.py`, what its loops share in `canvas.py`),
`prompt_cache.py` and `chat.py` (multi-turn reuse of the encoder cache), `images.py` (image
input for the vision tower), `loading.py` and
`convert.py` (checkpoints in and out, over `weights/`: safetensors, Hub, atomic writes),
`tuner/` (training), `cli/` (the command line), `ui/` (terminal views), `demos/` (Sudoku).
"""

from .errors import UserError
from .generate import GenerationResponse, GenerationSettings, StepEvent, generate, generate_step, stream_generate
from .loading import load, load_model
from .models import Model, ModelArgs

__all__ = [
    "GenerationResponse", "GenerationSettings", "Model", "ModelArgs", "StepEvent", "UserError",
    "generate", "generate_step", "load", "load_model", "stream_generate",
]
__version__ = "0.1.0"
