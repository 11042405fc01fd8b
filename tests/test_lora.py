"""LoRA / QLoRA fine-tuning: the objective's batches and masks, adapter layers, adapter
files, fusing, data formats and their one-line errors, and the `lora` / `fuse` commands."""

import json
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from reference import relative_error

from mlx_diffusiongemma import UserError
from mlx_diffusiongemma.demos.sudoku.solver import DEFAULT_MODEL
from mlx_diffusiongemma.loading import load, load_model
from mlx_diffusiongemma.models import Model, ModelArgs
from mlx_diffusiongemma.models.tiny import tiny_config
from mlx_diffusiongemma.tuner import lora
from mlx_diffusiongemma.tuner.datasets import Example, Renderer, load_dataset
from mlx_diffusiongemma.tuner.finetune import (
    LoRATrainingArgs, ObjectiveArgs, corrupt_canvas, decoder_pass, encoder_pass, lm_logits, lora_loss, make_batch,
    noisy_canvas, train_lora,
)

CONFIG = tiny_config(
    vision=False, vocab_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    global_head_dim=64, layer_types=["sliding_attention", "full_attention"], sliding_window=4, num_experts=4,
    max_position_embeddings=256,
)
KEYS_ALL = list(lora.DEFAULT_KEYS + lora.EXPERT_KEYS + lora.ROUTER_KEYS)


def tiny_model(seed: int = 0, config=CONFIG) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs.from_config(config))
    mx.eval(model.parameters())
    return model


def examples(seed: int = 0, shapes=((10, 5), (6, 12), (3, 20))) -> list[Example]:
    """Prompts and answers of different lengths (an answer of 20 spans three 8-token canvases)."""
    rng = np.random.RandomState(seed)
    ids = lambda n: [int(t) for t in rng.randint(5, 64, n)]  # noqa: E731
    return [Example(ids(p), ids(a) + [1]) for p, a in shapes]


def adapted(seed: int = 0, keys=None, rank: int = 4, random_b: bool = False, model=None) -> Model:
    model = model or tiny_model(seed)
    lora.detach_routers(model)
    lora.apply_lora(model, -1, dict(rank=rank, scale=2.0, keys=keys or list(lora.DEFAULT_KEYS)))
    if random_b:
        # LoRA B starts at zero; a random one makes the adapter change the outputs.
        mx.random.seed(seed + 1)
        model.update(tree_map_b(model))
    mx.eval(model.parameters())
    return model


def tree_map_b(model):
    from mlx.utils import tree_unflatten

    return tree_unflatten([(k, 0.05 * mx.random.normal(v.shape)) for k, v in lora.adapter_weights(model).items()
                           if k.endswith("lora_b")])


# --- the objective ---------------------------------------------------------------------------

def test_masked_batch_equals_each_row_encoded_alone():
    model = tiny_model()
    exs, choices = examples(), [0, 1, 2]
    batch = make_batch(exs, choices, 8, 0)
    kv, _ = encoder_pass(model, batch, full=False)
    noisy = mx.random.randint(0, 64, (3, 8), key=mx.random.key(3))
    signal = mx.random.normal((3, 8, 64), key=mx.random.key(4))
    for sc in (None, signal):
        logits = decoder_pass(model, noisy, kv, batch, sc)
        for i, (ex, c) in enumerate(zip(exs, choices)):
            cache = model.make_cache()
            model.encode(mx.array([ex.prompt + ex.answer[: c * 8]]), cache)
            ref = model.denoise(noisy[i : i + 1], cache, None if sc is None else sc[i : i + 1])
            assert mx.abs(ref - logits[i : i + 1]).max().item() < 1e-4


def test_canvas_split_supervises_answer_through_eos_only():
    exs = examples()
    batch = make_batch(exs, [0, 1, 2], 8, 0)
    # Example 2: answer of 21 tokens (20 + EOS), canvas 2 holds its last 5 then padding.
    assert batch.canvas[2].tolist() == exs[2].answer[16:] + [0, 0, 0]
    assert batch.supervised[2].tolist() == [True] * 5 + [False] * 3
    assert batch.supervised[1].tolist() == [True] * 5 + [False] * 3  # 13 = 8 + 5
    assert batch.supervised[0].tolist() == [True] * 6 + [False] * 2
    # Left-padded prefix: prompt + earlier canvases, padding masked out.
    assert batch.prefix.shape[1] == 3 + 16 and batch.valid[0].tolist() == [False] * 9 + [True] * 10


def _grad_wrt_logits(loss_of_logits, shape):
    return mx.grad(loss_of_logits)(mx.random.normal(shape, key=mx.random.key(0)))


def test_padding_after_eos_gets_no_gradient():
    """Hand-built: canvas = 3 answer tokens, EOS, 4 pads. The loss's gradient w.r.t. the
    decoder logits is zero at the 4 pads and non-zero at the 4 supervised positions."""
    ex = Example([7, 8, 9], [10, 11, 12, 1])
    batch = make_batch([ex], [0], 8, 0)
    model = tiny_model()
    kv, _ = encoder_pass(model, batch, full=False)

    def loss_from(shift):
        # Perturb the decoder's logits through its final hidden states' head.
        logits = decoder_pass(model, batch.canvas, kv, batch) + shift
        weights = batch.supervised.astype(mx.float32)
        return (nn.losses.cross_entropy(logits, batch.canvas) * weights).sum() / weights.sum()

    g = _grad_wrt_logits(loss_from, (1, 8, 64))
    per_position = mx.abs(g).sum(axis=-1)[0].tolist()
    assert all(v > 0 for v in per_position[:4]) and all(v == 0 for v in per_position[4:])
    # And end to end: the targets at post-EOS positions do not change the loss or its gradients.
    other = make_batch([ex], [0], 8, 0)
    other.canvas = mx.concatenate([batch.canvas[:, :4], mx.array([[33, 34, 35, 36]])], axis=1)
    model = adapted(random_b=True)
    key = mx.random.key(5)
    args = ObjectiveArgs(noise_min=1.0)  # every position corrupted: the input does not see targets
    (l1, _), g1 = nn.value_and_grad(model, lora_loss)(model, batch, key, False, args)
    (l2, _), g2 = nn.value_and_grad(model, lora_loss)(model, other, key, False, args)
    assert abs(l1.item() - l2.item()) < 1e-6
    for (_, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert mx.allclose(a, b, atol=1e-6).item()


def test_prompt_gets_no_gradient():
    """The canvas loss never sees the prompt; in the encoder co-loss the prompt's next-token
    positions weigh zero with mask_prompt (and the padding always), the answer's one."""
    short, long = Example([7, 8], [10, 11, 1]), Example([7, 8, 9, 9, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 1])
    batch = make_batch([short, long], [0, 1], 8, 0, encoder_loss=True, mask_prompt=True)
    T = batch.decoded
    assert T == 5 + 8  # the longer prefix: prompt + its first canvas
    w = batch.next_token.tolist()
    # Row 0: 11 pads, then prompt [7, 8] and answer [10, 11, 1]; position p predicts p + 1.
    assert w[0][:12] == [0.0] * 12 and w[0][12:15] == [1.0] * 3 and w[0][15:] == [0.0] * (len(w[0]) - 15)
    # Row 1: prompt of 5 then answer: the first weighted position is the prompt's last.
    assert w[1][:4] == [0.0] * 4 and w[1][4 : T + 1] == [1.0] * (T - 3)
    model = adapted(random_b=True)

    def encoder_co_loss(shift):
        _, hidden = encoder_pass(model, batch, full=True)
        logits = lm_logits(model, hidden[:, :-1]) + shift
        weights = batch.next_token[:, :-1]
        return (nn.losses.cross_entropy(logits, batch.prefix[:, 1:]) * weights).sum()

    g = mx.abs(_grad_wrt_logits(encoder_co_loss, (2, batch.prefix.shape[1] - 1, 64))).sum(axis=-1)
    assert (g[0, :12] == 0).all().item() and (g[0, 12:15] > 0).all().item() and (g[0, 15:] == 0).all().item()
    assert (g[1, :4] == 0).all().item() and (g[1, 4 : T + 1] > 0).all().item()
    unmasked = make_batch([short, long], [0, 1], 8, 0, encoder_loss=True, mask_prompt=False)
    assert unmasked.next_token[0, 11].item() == 1.0 and unmasked.next_token[0, 10].item() == 0.0


def test_pinned_positions_are_kept_clean_at_the_pinned_rate():
    """Positions 0, 2 and 9 of an 11-token answer are pinned: in canvas 1 of 8 only 9 (its
    index 1) is; with every position corrupted, rate 1 keeps exactly the pinned ones clean,
    rate 0 none, and a batch without pins draws the same noise as before pins existed."""
    pinned_ex = Example([5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 1], (0, 2, 9))
    batch = make_batch([pinned_ex, pinned_ex, Example([5], [20, 21, 1])], [1, 0, 0], 8, 0)
    assert batch.pinned.tolist() == [[False, True] + [False] * 6, [True, False, True] + [False] * 5, [False] * 8]
    key = mx.random.key(3)
    for rate in (1.0, 0.0):
        noisy, replaced = noisy_canvas(batch, 64, key, ObjectiveArgs(noise_min=1.0, pinned_rate=rate))
        assert (replaced == ~batch.pinned if rate else replaced).all().item()
    assert (mx.where(batch.pinned, noisy == batch.canvas, True)).all().item() is False  # rate 0: noise
    noisy, _ = noisy_canvas(batch, 64, key, ObjectiveArgs(noise_min=1.0, pinned_rate=1.0))
    assert mx.where(batch.pinned, noisy == batch.canvas, True).all().item()
    rows = make_batch([pinned_ex] * 200, [0] * 200, 8, 0)
    _, replaced = noisy_canvas(rows, 64, key, ObjectiveArgs(noise_min=1.0, pinned_rate=0.5))
    assert 60 < (~replaced[:, 0]).sum().item() < 140  # about half the rows keep their pins
    free = make_batch([Example([5], [20, 21, 1])], [0], 8, 0)
    assert free.pinned is None
    noisy, _ = noisy_canvas(free, 64, key, ObjectiveArgs())
    assert (noisy == corrupt_canvas(free.canvas, 64, key, 1e-3, 0.5)[0]).all().item()


def test_lora_steps_lower_the_loss_on_a_fixed_batch():
    for keys, gc, enc in ((None, False, 0.0), (KEYS_ALL, True, 0.5)):
        model = adapted(keys=keys)
        before = {k: v for k, v in tree_flatten(model.parameters()) if "lora" not in k}
        batch = make_batch(examples(), [0, 1, 2], 8, 0, encoder_loss=enc > 0)
        args = ObjectiveArgs(grad_checkpoint=gc, encoder_loss_weight=enc)
        step = nn.value_and_grad(model, lora_loss)
        opt, key, losses = optim.Adam(1e-2), mx.random.key(0), []
        for i in range(12):
            (loss, _), grads = step(model, batch, key, i % 2 == 0, args)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0]
        after = dict(tree_flatten(model.parameters()))
        assert all(mx.array_equal(v, after[k]).item() for k, v in before.items())  # base frozen


def test_grad_checkpoint_gives_the_same_gradients():
    batch = make_batch(examples(), [0, 1, 2], 8, 0)
    grads = []
    for gc in (False, True):
        model = adapted(random_b=True)  # grouped experts on CPU (host sync inside the checkpoint)
        grads.append(nn.value_and_grad(model, lora_loss)(model, batch, mx.random.key(1), True,
                                                           ObjectiveArgs(grad_checkpoint=gc))[1])
    for (_, a), (_, b) in zip(tree_flatten(grads[0]), tree_flatten(grads[1])):
        assert mx.allclose(a, b, atol=1e-5).item()


def test_train_lora_reports_saves_checkpoints_and_saves_on_interrupt(tmp_path):
    model = adapted()
    saved, reports = [], []
    args = LoRATrainingArgs(iters=4, batch_size=2, learning_rate=1e-3, steps_per_report=2, steps_per_eval=2,
                            val_batches=1, save_every=2, adapter_file=str(tmp_path / "adapters.safetensors"))
    losses = train_lora(model, examples() * 2, examples(1), args, saved.append, reports.append)
    assert len(losses) == 4 and saved == [str(tmp_path / "0000002_adapters.safetensors"), args.adapter_file]
    kinds = [r.kind for r in reports]
    assert kinds.count("train") == 2 and kinds.count("val") == 3
    train = [r for r in reports if r.kind == "train"][-1]
    assert train.its_per_sec > 0 and train.tokens_per_sec > 0 and train.peak_memory_gb > 0
    from mlx_diffusiongemma.tuner.finetune import TrainingInterrupted

    def interrupt(r):
        if r.kind == "step":
            raise KeyboardInterrupt

    saved.clear()
    with pytest.raises(TrainingInterrupted) as e:
        train_lora(model, examples(), [], args, saved.append, interrupt)
    assert e.value.iteration == 1 and saved == [args.adapter_file]


# --- adapters and fusing ---------------------------------------------------------------------

def _logits(model, seed: int = 0):
    rng = np.random.RandomState(seed)
    cache = model.make_cache()
    model.encode(mx.array(rng.randint(0, model.args.vocab_size, (1, 12))), cache)
    return model.denoise(mx.array(rng.randint(0, model.args.vocab_size, (1, model.args.canvas_length))), cache)


def test_adapters_round_trip_through_disk(tmp_path):
    model = adapted(keys=KEYS_ALL, random_b=True)
    params = lora.lora_parameters(rank=4, scale=2.0, keys=KEYS_ALL)
    path = lora.save_adapters(model, tmp_path, lora.adapter_config(model, -1, params))
    assert path.name == "adapters.safetensors" and json.loads((tmp_path / "adapter_config.json").read_text())[
        "lora_parameters"]["rank"] == 4
    fresh = tiny_model()
    lora.load_adapters(fresh, tmp_path)
    for k, v in lora.adapter_weights(model).items():
        assert mx.array_equal(v, lora.adapter_weights(fresh)[k]).item()
    assert mx.abs(_logits(model) - _logits(fresh)).max().item() < 1e-6


def test_fused_float32_logits_equal_the_adapted_model():
    model = adapted(keys=KEYS_ALL, random_b=True)
    model.eval()
    before = _logits(model)
    assert mx.abs(before - _logits(tiny_model())).max().item() > 1e-2  # the adapter matters
    lora.fuse(model)
    assert not any("lora" in k for k, _ in tree_flatten(model.parameters()))
    # Relative to the logit scale, as the parity tests measure float32 agreement.
    assert relative_error(np.array(_logits(model)), np.array(before)) < 1e-5


def test_mismatched_adapters_are_one_line_errors(tmp_path):
    model = adapted(random_b=True)
    lora.save_adapters(model, tmp_path / "a", lora.adapter_config(model, -1, lora.lora_parameters(rank=4, scale=2.0)))
    other = tiny_model(config=tiny_config(vision=False, vocab_size=64, hidden_size=32, num_attention_heads=2,
                                          num_key_value_heads=1, head_dim=16, global_head_dim=32,
                                          layer_types=["sliding_attention", "full_attention"], sliding_window=4))
    with pytest.raises(UserError, match="another model") as e:
        lora.load_adapters(other, tmp_path / "a")
    assert "\n" not in str(e.value)
    # Same model, config edited to another rank: the tensors no longer fit.
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 8
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"shape .* expects .*another rank") as e:
        lora.load_adapters(tiny_model(), tmp_path / "a")
    # Another model whose recorded dimensions were lost: still caught by the shapes.
    del config["base_model"]
    config["lora_parameters"]["rank"] = 4
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="shape"):
        lora.load_adapters(other, tmp_path / "a")
    with pytest.raises(UserError, match="adapter_config.json is missing"):
        lora.load_adapters(tiny_model(), tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        lora.load_adapters(tiny_model(), tmp_path / "b")
    with pytest.raises(UserError, match="not a linear layer"):
        lora.apply_lora(tiny_model(), -1, dict(keys=["self_attn.q_norm"]))


# --- QLoRA on a 4-bit conversion ------------------------------------------------------------

@pytest.fixture(scope="module")
def converted_4bit(tmp_path_factory):
    """A tiny reference checkpoint (dimensions multiples of 64, so every linear is
    quantized) converted with the default mixed 4-bit recipe, and its float32 conversion."""
    from reference import make_reference

    from mlx_diffusiongemma.convert import convert

    src = tmp_path_factory.mktemp("hf")
    make_reference(src, seed=1, canvas_length=16, hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
                   head_dim=64, global_head_dim=128, vocab_size=256)
    root = tmp_path_factory.mktemp("mlx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer in the random checkpoint
        return convert(src, root / "4bit"), convert(src, root / "f32", quantize=False, dtype="float32")


def test_qlora_trains_on_a_4bit_conversion_with_frozen_quantized_base(converted_4bit):
    model = load_model(converted_4bit[0], text_only=True)
    lora.detach_routers(model)
    lora.apply_lora(model, -1, dict(rank=4, scale=2.0, keys=KEYS_ALL))
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q.linear, nn.QuantizedLinear) and q.lora_a.dtype == mx.float32
    base = {k: v for k, v in tree_flatten(model.parameters()) if "lora" not in k}
    assert all("lora" in k for k, _ in tree_flatten(model.trainable_parameters()))
    exs = [Example([int(t) for t in np.random.RandomState(i).randint(5, 256, 9)], list(range(20, 36)) + [1])
           for i in range(4)]
    batch = make_batch(exs, [0, 0, 1, 1], 16, 0)
    step = nn.value_and_grad(model, lora_loss)
    opt, losses = optim.Adam(1e-2), []
    for i in range(8):
        (loss, _), grads = step(model, batch, mx.random.key(0), False, ObjectiveArgs())
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(v, after[k]).item() for k, v in base.items())


def test_fused_4bit_logits_are_within_the_quantization_error(converted_4bit, tmp_path):
    q4, f32 = converted_4bit
    model = adapted(model=load_model(q4, text_only=True), keys=KEYS_ALL, random_b=True)
    model.eval()
    adapted_logits = _logits(model)
    quantization_error = mx.abs(_logits(load_model(q4, text_only=True)) - _logits(load_model(f32, text_only=True)))
    lora.fuse(model)  # re-quantized with each layer's own bits
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    error = mx.abs(_logits(model) - adapted_logits).max().item()
    assert 0 < error <= 2 * quantization_error.max().item()
    # Written out, the fused model loads as an ordinary 4-bit model directory.
    out = lora.save_model(model, q4, tmp_path / "fused")
    assert mx.abs(_logits(load_model(out, text_only=True)) - _logits(model)).max().item() < 1e-5


# --- data ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return load(DEFAULT_MODEL)[1]


def write(folder, name, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")


def test_each_data_format_loads(tmp_path, tokenizer):
    chat = {"messages": [{"role": "user", "content": "12"}, {"role": "assistant", "content": "34"}]}
    write(tmp_path, "train.jsonl", [chat, {"prompt": "12", "completion": "34"}, "", {"text": "1234"}])
    write(tmp_path, "valid.jsonl", [chat])
    sets = load_dataset(tmp_path, tokenizer)
    assert sets["test"] == [] and len(sets["valid"]) == 1
    chat_ex, completion_ex, text_ex = sets["train"]
    assert chat_ex == completion_ex
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "12"}], add_generation_prompt=True,
                                           tokenize=False, enable_thinking=False)
    assert chat_ex.prompt == tokenizer.encode(prompt, add_special_tokens=False)
    turn_end = tokenizer.convert_tokens_to_ids("<turn|>")
    assert chat_ex.answer == tokenizer.encode("34", add_special_tokens=False) + [turn_end]
    assert turn_end in tokenizer.eos_token_ids
    assert text_ex.prompt == [tokenizer.bos_token_id] and text_ex.answer[-1] == tokenizer.eos_token_id
    assert Renderer(tokenizer).eot == turn_end


def test_pinned_spans_mark_the_answer_tokens_inside_them(tokenizer):
    """Offsets count in the answer as written (its leading space included); a token is
    pinned only when it lies wholly inside a span."""
    render = Renderer(tokenizer)
    answer = " 123\n456"
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
            "pinned_spans": [[1, 2], [3, 6], [6, 7]]}
    ex = render(chat)
    assert ex.answer == tokenizer.encode(answer.strip(), add_special_tokens=False) + [render.eot]
    assert [tokenizer.decode([ex.answer[i]]) for i in ex.pinned] == ["1", "3", "\n", "4", "5"]
    assert render({"prompt": "q", "completion": answer, "pinned_spans": [[1, 2]]}).pinned == (0,)
    assert render({"prompt": "q", "completion": answer}).pinned == ()


@pytest.mark.parametrize("line, message", [
    ({"prompt": "x", "completion": "12", "pinned_spans": [[0, 3]]}, r"train.jsonl:2: pinned span \[0, 3\] is not within"),
    ({"prompt": "x", "completion": "12", "pinned_spans": [[1, 1]]}, r"train.jsonl:2: pinned span \[1, 1\]"),
    ({"prompt": "x", "completion": "12", "pinned_spans": [0, 1]}, r"train.jsonl:2: \"pinned_spans\" must be a list"),
    ({"prompt": "x", "completion": "12", "pinned_spans": [[0.0, 1]]}, r"train.jsonl:2: \"pinned_spans\" must be a list"),
    ({"text": "12", "pinned_spans": [[0, 1]]}, r"train.jsonl:2: \"pinned_spans\" needs a chat or completions line"),
    ("{not json", r"train.jsonl:2: not valid JSON"),
    ("[1, 2]", r"train.jsonl:2: expected a JSON object"),
    ({"question": "x"}, r"train.jsonl:2: has keys \['question'\]"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"train.jsonl:2: the last message must be the assistant"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"train.jsonl:2: each message needs a \"role\""),
    ({"prompt": "x", "completion": 3}, r"train.jsonl:2: \"prompt\" and \"completion\" must be strings"),
    ({"text": ""}, r"train.jsonl:2: \"text\" must be a non-empty string"),
])
def test_malformed_data_is_a_one_line_error_naming_file_and_line(tmp_path, tokenizer, line, message):
    write(tmp_path, "train.jsonl", [{"text": "12"}, line])
    with pytest.raises(UserError, match=message) as e:
        load_dataset(tmp_path, tokenizer)
    assert "\n" not in str(e.value)


# --- the commands ---------------------------------------------------------------------------

def test_lora_and_fuse_commands_on_the_sudoku_model(tmp_path, capsys):
    from mlx_diffusiongemma.cli import main

    grid = "\n".join(["123456789"] * 9)
    chat = {"messages": [{"role": "user", "content": grid.replace("1", ".")}, {"role": "assistant", "content": grid}]}
    for split in ("train", "valid", "test"):
        write(tmp_path / "data", f"{split}.jsonl", [chat] * 2)
    (tmp_path / "c.yaml").write_text("lora_parameters:\n  rank: 2\n  scale: 1.0\nsteps_per_report: 1\n")
    adapters = tmp_path / "adapters"
    args = ["lora", "--model", str(DEFAULT_MODEL), "--data", str(tmp_path / "data"), "--adapter-path", str(adapters),
            "--iters", "2", "--batch-size", "2", "--learning-rate", "1e-3", "--steps-per-eval", "2",
            "--val-batches", "1", "--save-every", "1", "--test", "-c", str(tmp_path / "c.yaml")]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    out = capsys.readouterr()
    assert "Iter 2: Train loss" in out.out and "It/sec" in out.out and "Peak mem" in out.out
    assert "Test loss" in out.out and "Trainable parameters" in out.err
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 2 and (adapters / "0000001_adapters.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        main(["fuse", "--model", str(DEFAULT_MODEL), "--adapter-path", str(adapters),
              "--save-path", str(tmp_path / "fused"), "--dequantize"])
    assert e.value.code == 0
    fused, _ = load(tmp_path / "fused")
    with_adapter, _ = load(DEFAULT_MODEL, adapter_path=adapters)
    assert not any(k.endswith(".scales") for k, _ in tree_flatten(fused.parameters()))
    assert mx.abs(_logits(fused) - _logits(with_adapter)).max().item() < 1e-4
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(DEFAULT_MODEL), "--adapter-path", str(adapters), "--steps", "2",
              "--seed", "0", "--json", grid.replace("1", ".")])
    assert e.value.code == 0 and json.loads(capsys.readouterr().out)["steps"] == [2]
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(DEFAULT_MODEL), "--adapter-path", str(tmp_path), "x"])
    assert e.value.code == 1 and "adapter_config.json is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["lora", "--model", str(DEFAULT_MODEL), "--data", str(tmp_path / "nowhere")])
    assert e.value.code == 1 and "error: data folder" in capsys.readouterr().err
