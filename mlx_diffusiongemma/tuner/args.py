"""The fine-tuning settings, apart from the training code: the CLI reads their defaults
(for its options and `--help`) without importing the trainer."""

from dataclasses import dataclass, field


@dataclass
class ObjectiveArgs:
    """Settings of the fine-tuning objective.

    The corrupted fraction of a canvas is t = noise_min + (1 - noise_min) * u ** noise_exponent,
    u ~ U(0, 1) per example; an exponent below 1 leans toward the heavy noise the sampler
    starts from. Positions left clean weigh `clean_weight` in the loss. An example with
    pinned positions keeps them clean with probability `pinned_rate` (t then applies to
    its other positions) and is corrupted like any other otherwise, so both pinned and
    free generation are trained.

    The defaults lean toward what the sampler does (it starts from pure noise and
    self-conditions every step): on the Sudoku fine-tune they solved 94.0% / 38.5% of
    40 / 50-blank puzzles against 88.0% / 25.5% for the published recipes' exponent 1 and
    rate 0.5 (benchmarks/README.md), at ~9% more time per step.
    """

    noise_min: float = 1e-3
    noise_exponent: float = 0.5
    self_conditioning_rate: float = 0.8
    clean_weight: float = 1.0
    pinned_rate: float = 0.5
    encoder_loss_weight: float = 0.0
    mask_prompt: bool = False
    grad_checkpoint: bool = False


@dataclass
class LoRATrainingArgs:
    """The loop's settings, named after mlx-lm's `TrainingArgs`."""

    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    adapter_file: str = "adapters/adapters.safetensors"
    grad_accumulation_steps: int = 1
    max_seq_length: int = 2048
    seed: int = 0
    lr_schedule: dict | None = None
    objective: ObjectiveArgs = field(default_factory=ObjectiveArgs)
