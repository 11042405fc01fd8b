"""Image input against the transformers 5.23 reference: the vision tower's features, the
encoder cache and the decoder logits after a prompt with images, committed tokens in the
deterministic regime, the preprocessing, and one-line errors for bad images."""

import numpy as np
import pytest
import torch
import mlx.core as mx
from PIL import Image
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DynamicCache
from transformers.models.diffusion_gemma import generation_diffusion_gemma as ref_generation
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from mlx_diffusiongemma import UserError, generate_step, load_model
from mlx_diffusiongemma.images import expand_image_tokens, prepare_image
from mlx_diffusiongemma.models import diffusion_gemma
from mlx_diffusiongemma.models.tiny import tiny_config
from reference import randomize, relative_error, to_numpy
from vision_fixtures import BUDGET, CANVAS, PATCH, picture, vision_chat_model

IMAGE, BOI, EOI = 150, 151, 152
# Two towers: grouped-query attention with clipped linears and standardized features; and
# plain multi-head attention. The text windows are shorter than an image, so image tokens
# must see each other beyond the sliding window.
VISION = {
    "clipped": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    use_clipped_linears=True, standardize=True),
    "plain": dict(num_hidden_layers=1, hidden_size=48, intermediate_size=80, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=24, global_head_dim=24),
}
TEXT = {"clipped": dict(sliding_window=16), "plain": dict(sliding_window=12, num_experts=6, top_k_experts=3)}


def reference_model(name: str, seed: int) -> DiffusionGemmaForBlockDiffusion:
    cfg = tiny_config(CANVAS, **TEXT[name])
    vision = dict(cfg["vision_config"], patch_size=PATCH, pooling_kernel_size=3, position_embedding_size=256,
                  **VISION[name])
    config = DiffusionGemmaConfig(text_config=cfg["text_config"], vision_config=vision, canvas_length=CANVAS,
                                  image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI,
                                  vision_soft_tokens_per_image=BUDGET)
    torch.manual_seed(seed)
    ref = DiffusionGemmaForBlockDiffusion(config).eval()
    randomize(ref, seed, 0.6)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "vision" in n:
                # Norm weights away from 1 (w, not 1 + w); clipping ranges that bite.
                p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in n else 0.0))
        for n, b in ref.named_buffers():
            if n.endswith(("std_bias", "std_scale")):
                b.copy_(0.5 + 0.5 * torch.rand(b.shape, generator=g))
            elif n.endswith(("input_min", "output_min")):
                b.fill_(-1.5)
            elif n.endswith(("input_max", "output_max")):
                b.fill_(1.5)
    return ref


@pytest.fixture(scope="module", params=list(VISION))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = reference_model(request.param, seed=len(request.param))
    ref.save_pretrained(path)
    return ref, load_model(path, text_only=False)


def processor(budget: int = BUDGET) -> Gemma4ImageProcessorPil:
    return Gemma4ImageProcessorPil(patch_size=PATCH, max_soft_tokens=budget, pooling_kernel_size=3)


IMAGES = {
    "tiny": (3, 5, "RGB"), "tall": (200, 31, "RGB"), "wide": (20, 400, "RGB"), "square": (48, 48, "RGB"),
    "over-budget": (640, 480, "RGB"), "thin": (2, 900, "RGB"), "grayscale": (90, 60, "L"), "rgba": (70, 50, "RGBA"),
}


def reference_inputs(images: list[Image.Image], budget: int = BUDGET) -> dict:
    return processor(budget)(images=images, return_tensors="np")


@pytest.mark.parametrize("budget", [70, 140])
@pytest.mark.parametrize("kind", list(IMAGES))
def test_preprocessing_equals_the_reference_processor(kind, budget):
    img = picture(*IMAGES[kind], seed=len(kind))
    theirs = reference_inputs([img], budget)
    ours = prepare_image(img, budget, patch_size=PATCH)
    n = ours.pixels.shape[0]
    assert ours.soft_tokens == theirs["num_soft_tokens_per_image"][0]
    assert n == ours.soft_tokens * 9 <= budget * 9
    assert np.array_equal(ours.pixels, theirs["pixel_values"][0, :n])
    assert np.array_equal(ours.positions, theirs["image_position_ids"][0, :n])
    # The rest is the reference's padding, which the tower never sees.
    assert (theirs["image_position_ids"][0, n:] == -1).all()


def test_arrays_and_files_prepare_like_the_image(tmp_path):
    img = picture(37, 81, "RGBA", seed=4)
    img.save(tmp_path / "a.png")
    expected = prepare_image(img, BUDGET, patch_size=PATCH)
    data_url = "data:image/png;base64," + __import__("base64").b64encode((tmp_path / "a.png").read_bytes()).decode()
    for source in (np.asarray(img), tmp_path / "a.png", str(tmp_path / "a.png"), data_url):
        got = prepare_image(source, BUDGET, patch_size=PATCH)
        assert np.array_equal(got.pixels, expected.pixels) and got.digest == expected.digest


def test_placeholders_expand_like_the_reference_processor():
    # The processor writes boi + soft_tokens x image + eoi for each image placeholder.
    images = [prepare_image(picture(*IMAGES[k]), BUDGET, patch_size=PATCH) for k in ("tall", "wide")]
    soft = reference_inputs([picture(*IMAGES[k]) for k in ("tall", "wide")])["num_soft_tokens_per_image"]
    ids = [2, 10, IMAGE, 11, 12, IMAGE, 13]
    expected = [2, 10, BOI] + [IMAGE] * soft[0] + [EOI, 11, 12, BOI] + [IMAGE] * soft[1] + [EOI, 13]
    assert expand_image_tokens(ids, images, IMAGE, BOI, EOI) == expected


@pytest.mark.parametrize("kind", ["tiny", "tall", "over-budget", "rgba"])
def test_tower_features_match_the_reference(pair, kind):
    ref, model = pair
    img = picture(*IMAGES[kind], seed=1)
    inputs = reference_inputs([img])
    with torch.no_grad():
        theirs = ref.model.encoder.get_image_features(
            torch.tensor(inputs["pixel_values"]), torch.tensor(inputs["image_position_ids"])).pooler_output
    ours = model.embed_images([prepare_image(img, BUDGET, patch_size=PATCH)])[0]
    assert ours.shape == tuple(theirs.shape)
    assert relative_error(np.array(ours), to_numpy(theirs)) < 1e-4


def test_chunked_attention_in_the_tower_changes_nothing(pair):
    _, model = pair
    image = prepare_image(picture(*IMAGES["over-budget"]), BUDGET, patch_size=PATCH)
    tower, embed = model.model.encoder.vision_tower, model.model.encoder.embed_vision
    args = mx.array(image.pixels)[None], mx.array(image.positions)[None], image.grid
    tower.query_chunk = None
    whole = np.array(embed(tower(*args)))
    tower.query_chunk = 100
    try:
        chunked = np.array(embed(tower(*args)))
    finally:
        tower.query_chunk = 1024
    assert np.abs(whole - chunked).max() < 1e-5


def image_prompt(kinds: list[str], seed: int) -> tuple[list[int], list[Image.Image]]:
    """Token ids with one placeholder per image among random text, and the images."""
    rng = np.random.RandomState(seed)
    ids = [2] + rng.randint(5, 140, 3).tolist()
    for _ in kinds:
        ids += [IMAGE] + rng.randint(5, 140, 4).tolist()
    return ids, [picture(*IMAGES[k], seed=seed + i) for i, k in enumerate(kinds)]


def reference_encode(ref, ids: list[int], images: list[Image.Image], pkv=None):
    """The reference encoder's pass over an expanded prompt, with the masks `generate`
    builds (image tokens of one image see each other)."""
    inputs = reference_inputs(images)
    input_ids = torch.tensor([ids])
    pkv = pkv if pkv is not None else DynamicCache(config=ref.config.get_text_config(decoder=True))
    positions = torch.arange(len(ids))[None]
    masks = ref.model.encoder.create_masks_for_generate(
        config=ref.config, inputs_embeds=torch.empty((1, len(ids), 0)), attention_mask=torch.ones((1, len(ids)), dtype=torch.bool),
        past_key_values=pkv, position_ids=positions, mm_token_type_ids=(input_ids == IMAGE).long(),
    )
    with torch.no_grad():
        ref.model.encoder(input_ids=input_ids, pixel_values=torch.tensor(inputs["pixel_values"]),
                          image_position_ids=torch.tensor(inputs["image_position_ids"]), attention_mask=masks,
                          past_key_values=pkv, position_ids=positions)
    return pkv


def our_encode(model, ids: list[int], images: list[Image.Image], step: int | None = None):
    prepared = [prepare_image(img, BUDGET, patch_size=PATCH) for img in images]
    expanded = expand_image_tokens(ids, prepared, IMAGE, BOI, EOI)
    cache = model.make_cache()
    if step is not None:
        model.prefill_step_size = step
    try:
        model.encode(mx.array([expanded]), cache, model.embed_images(prepared))
    finally:
        model.prefill_step_size = 512
    return expanded, cache


def assert_caches_match(model, cache, pkv):
    for i, (ours, theirs) in enumerate(zip(cache, pkv.layers)):
        k, v = to_numpy(theirs.keys), to_numpy(theirs.values)
        n = min(ours.keys.shape[2], k.shape[2])
        assert relative_error(np.array(ours.keys[:, :, -n:]), k[:, :, -n:]) < 1e-4, f"layer {i} keys"
        assert relative_error(np.array(ours.values[:, :, -n:]), v[:, :, -n:]) < 1e-4, f"layer {i} values"


@pytest.mark.parametrize("kinds", [["tall"], ["wide", "rgba"]], ids=["one-image", "two-images"])
def test_encoder_cache_and_logits_after_an_image_prompt(pair, kinds):
    ref, model = pair
    ids, images = image_prompt(kinds, seed=len(kinds))
    expanded, cache = our_encode(model, ids, images)
    pkv = reference_encode(ref, expanded, images)
    assert cache[0].offset == pkv.get_seq_length() == len(expanded)
    assert_caches_match(model, cache, pkv)
    canvas = np.random.RandomState(9).randint(0, 160, (1, CANVAS))
    with torch.no_grad():
        theirs = ref(past_key_values=pkv, decoder_input_ids=torch.tensor(canvas)).logits
    ours = np.array(model.denoise(mx.array(canvas), cache))
    assert relative_error(ours, to_numpy(theirs)) < 1e-4


def test_image_tokens_see_each_other_beyond_the_sliding_window(pair, monkeypatch):
    ref, model = pair
    ids, images = image_prompt(["tall"], seed=3)
    expanded, cache = our_encode(model, ids, images)
    assert expanded.count(IMAGE) > model.args.sliding_window
    pkv = reference_encode(ref, expanded, images)
    assert_caches_match(model, cache, pkv)
    # Without the image mask (plain causal attention) the same features give another
    # cache: the parity above does test the mask.
    monkeypatch.setattr(diffusion_gemma, "image_mask", lambda images, T: mx.zeros((1, 1, 1, 1), dtype=mx.bool_))
    _, causal = our_encode(model, ids, images)
    assert relative_error(np.array(causal[-1].keys), to_numpy(pkv.layers[-1].keys)) > 1e-3


def test_chunks_never_split_an_image(pair):
    ref, model = pair
    ids, images = image_prompt(["wide", "tall"], seed=5)
    _, whole = our_encode(model, ids, images)
    # Chunks of 7 tokens would end inside both images; each chunk stretches to the image's end.
    expanded, chunked = our_encode(model, ids, images, step=7)
    assert_caches_match(model, chunked, reference_encode(ref, expanded, images))
    for a, b in zip(whole, chunked):
        assert np.abs(np.array(a.keys) - np.array(b.keys)).max() < 1e-5


DETERMINISTIC = dict(t_max=2e-3, t_min=1e-3, entropy_bound=1e9, max_denoising_steps=12)


def test_generate_step_commits_the_reference_tokens_with_an_image(pair, monkeypatch):
    ref, model = pair
    ids, images = image_prompt(["square"], seed=7)
    prepared = [prepare_image(images[0], BUDGET, patch_size=PATCH)]
    expanded = expand_image_tokens(ids, prepared, IMAGE, BOI, EOI)
    initial = np.random.RandomState(1).randint(5, 140, CANVAS).tolist()
    monkeypatch.setattr(ref_generation.EntropyBoundSampler, "initialize_canvas",
                        lambda self, batch_size, device: torch.tensor([initial]))
    inputs = reference_inputs(images)
    input_ids = torch.tensor([expanded])
    with torch.no_grad():
        out = ref.generate(
            input_ids, pixel_values=torch.tensor(inputs["pixel_values"]),
            image_position_ids=torch.tensor(inputs["image_position_ids"]),
            mm_token_type_ids=(input_ids == IMAGE).long(), max_new_tokens=3 * CANVAS,
            sampler_config=ref_generation.EntropyBoundSamplerConfig(entropy_bound=1e9),
            t_max=2e-3, t_min=1e-3, max_denoising_steps=12, stability_threshold=1,
            confidence_threshold=0.005, eos_token_id=[159], pad_token_id=0,
        )
    theirs = out.sequences[0, len(expanded):].tolist()
    ours = []
    for event in generate_step(model, expanded, images=prepared, initial_canvas=initial, eos_token_ids=[159],
                               max_tokens=3 * CANVAS, seed=0, **DETERMINISTIC):
        if event.committed is not None:
            ours += event.committed
    assert len(theirs) == 3 * CANVAS
    assert ours == theirs


# ---------------------------------------------------------------- chat and the text API

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from mlx_diffusiongemma import load

    path = tmp_path_factory.mktemp("vision-chat")
    ids = vision_chat_model(path)
    model, tokenizer = load(path, text_only=False)
    return path, model, tokenizer, ids


FAST = dict(max_tokens=2 * CANVAS, max_denoising_steps=3, seed=0)


def small_images(n: int) -> list:
    return [prepare_image(picture(24 + 12 * i, 36, seed=i), BUDGET, patch_size=PATCH) for i in range(n)]


def count_tower_calls(model, monkeypatch) -> list:
    tower = model.model.encoder.vision_tower
    calls, original = [], type(tower).__call__

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(type(tower), "__call__", counted)
    model._image_features.clear()
    return calls


def test_chat_reuses_the_cache_over_an_image_and_runs_the_tower_once(chat_model, monkeypatch):
    from mlx_diffusiongemma.chat import ChatSession

    _, model, tokenizer, ids = chat_model
    calls = count_tower_calls(model, monkeypatch)
    session = ChatSession(model, tokenizer, **FAST)
    list(session.reply("What is in this picture?", images=small_images(1)))
    first = session.last_turn
    list(session.reply("And the colours?"))
    second = session.last_turn
    cached = session.prompt_cache.ids
    image_end = max(i for i, k in enumerate(cached) if isinstance(k, tuple)) + 1
    assert first.reused_tokens == 0 and second.reused_tokens > image_end
    assert len(calls) == 1
    # The reused cache gives the logits of a fresh encoding of the same prompt and image.
    plain = [k if not isinstance(k, tuple) else ids["boi"] if k[1] == -1 else ids["image"] for k in cached]
    fresh = model.make_cache()
    model.encode(mx.array([plain]), fresh, model.embed_images(session.images))
    canvas = mx.array([list(range(10, 10 + CANVAS))])
    a, b = np.array(model.denoise(canvas, session.prompt_cache.cache)), np.array(model.denoise(canvas, fresh))
    assert relative_error(a, b) < 1e-5


def test_chat_does_not_reuse_a_different_image_at_the_same_place(chat_model):
    from mlx_diffusiongemma.chat import ChatSession

    _, model, tokenizer, ids = chat_model
    first, other = small_images(2)
    session = ChatSession(model, tokenizer, **FAST)
    list(session.reply("Describe it.", images=[first]))
    session.messages, session.images = [], []  # same words, another image
    list(session.reply("Describe it.", images=[other]))
    # The image's keys begin at its boi: the reused prefix ends before it.
    boi = next(i for i, k in enumerate(session.prompt_cache.ids) if isinstance(k, tuple))
    assert session.prompt_cache.ids[boi] == (other.digest, -1)
    assert session.last_turn.reused_tokens <= boi


def test_stream_generate_with_an_image_commits_what_generate_step_does(chat_model):
    from mlx_diffusiongemma import stream_generate
    from mlx_diffusiongemma.images import expand_for

    _, model, tokenizer, ids = chat_model
    images = small_images(2)
    prompt = "<bos>Compare <|image|> with <|image|> please"
    settings = dict(FAST, t_max=2e-3, t_min=1e-3, entropy_bound=1e9)
    committed = [t for r in stream_generate(model, tokenizer, prompt, images=images, **settings)
                 if r.committed for t in r.committed]
    expanded = expand_for(model, tokenizer.encode(prompt, add_special_tokens=False), images)
    assert expanded.count(ids["image"]) == sum(i.soft_tokens for i in images)
    direct = [t for e in generate_step(model, expanded, images=images, **settings) if e.committed for t in e.committed]
    assert committed == direct


# ---------------------------------------------------------------- bad inputs: one line each

def one_line_error(fn, *words):
    with pytest.raises(UserError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def png_bytes(h=64, w=64) -> bytes:
    import io

    buf = io.BytesIO()
    picture(h, w, seed=2).save(buf, format="PNG")
    return buf.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header declares `width` x `height` (a decompression bomb)."""
    import struct
    import zlib

    data = bytearray(png_bytes(1, 1))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17]))
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_bad_image_files_are_one_line_errors(tmp_path):
    cases = {
        "notes.png": (b"this is plain text, not a picture\n" * 10, ["not an image"]),
        "empty.png": (b"", ["empty", "0 bytes"]),
        "cut.png": (png_bytes(256, 256)[: 20000], ["truncated or corrupt"]),
        "bomb.png": (declared_png(100_000, 100_000), ["pixel limit", "refusing"]),
        "large.png": (declared_png(12_000, 9_000), ["12000 x 9000", "refusing"]),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        one_line_error(lambda: prepare_image(tmp_path / name), name, *words)
    one_line_error(lambda: prepare_image(tmp_path / "missing.jpg"), "no such image file")
    one_line_error(lambda: prepare_image(tmp_path), "is a directory")
    one_line_error(lambda: prepare_image("https://example.com/cat.png"), "remote images are not fetched")
    one_line_error(lambda: prepare_image(np.zeros((4, 4), dtype=np.float32)), "uint8")
    one_line_error(lambda: prepare_image(np.zeros((4, 4, 2), dtype=np.uint8)), "shape")
    one_line_error(lambda: prepare_image(picture(8, 8), max_soft_tokens=100), "one of")


def test_placeholders_and_images_must_agree(chat_model):
    from mlx_diffusiongemma import stream_generate

    _, model, tokenizer, ids = chat_model
    one, two = small_images(1), small_images(2)
    one_line_error(lambda: list(stream_generate(model, tokenizer, "<bos>Look: <|image|>", images=two, **FAST)),
                   "1 image placeholder for 2 images")
    one_line_error(lambda: list(stream_generate(model, tokenizer, "<bos><|image|><|image|>", images=one, **FAST)),
                   "2 image placeholders for 1 image")
    one_line_error(lambda: list(stream_generate(model, tokenizer, "<bos>No picture here", images=one, **FAST)),
                   "0 image placeholders for 1 image")
    # A prompt with image tokens but no images is refused by the encoder's check too.
    expanded = expand_image_tokens([2, ids["image"], 7], one, ids["image"], ids["boi"], ids["eoi"])
    one_line_error(lambda: model.encode(mx.array([expanded]), model.make_cache(), model.embed_images(two)),
                   "2 were given")


def test_an_image_for_a_text_only_model_is_one_line(chat_model):
    from mlx_diffusiongemma import load, stream_generate
    from mlx_diffusiongemma.chat import ChatSession

    path = chat_model[0]
    model, tokenizer = load(path)  # text-only by default
    one_line_error(lambda: list(stream_generate(model, tokenizer, "<bos><|image|>", images=small_images(1))),
                   "text-only", "text_only=False")
    session = ChatSession(model, tokenizer, **FAST)
    one_line_error(lambda: session.reply("Hi", images=small_images(1)), "text-only")
    assert session.messages == [] and session.images == []


# ---------------------------------------------------------------- the command line

def cli(args, input=None):
    from typer.testing import CliRunner

    from mlx_diffusiongemma import cli as cli_module

    return CliRunner().invoke(cli_module.app, args, input=input)


CLI_FAST = ["--max-tokens", str(CANVAS), "--steps", "2", "--seed", "0"]


def test_cli_generate_with_images(chat_model, tmp_path):
    path = str(chat_model[0])
    for i in range(2):
        picture(30, 40 + 10 * i, seed=i).save(tmp_path / f"p{i}.png")
    result = cli(["generate", "What differs?", "-m", path, "--image", str(tmp_path / "p0.png"),
                  "--image", str(tmp_path / "p1.png"), "--json", *CLI_FAST])
    assert result.exit_code == 0, result.output
    report = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    soft = sum(prepare_image(tmp_path / f"p{i}.png", BUDGET, patch_size=PATCH).soft_tokens for i in range(2))
    assert report["prompt_tokens"] > soft
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    bad = cli(["generate", "Hi", "-m", path, "--image", str(tmp_path / "bad.png"), *CLI_FAST])
    assert bad.exit_code != 0 and "not an image" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_cli_chat_image_command(chat_model, tmp_path):
    path = str(chat_model[0])
    picture(30, 40).save(tmp_path / "p.png")
    lines = f"/image {tmp_path / 'p.png'}\nWhat is this?\n/image {tmp_path / 'none.png'}\n/stats\n"
    result = cli(["chat", "-m", path, *CLI_FAST], input=lines)
    assert result.exit_code == 0, result.output
    assert "image 1 attached" in result.output and "no such image file" in result.output
    text_only = cli(["chat", "-m", path, "--text-only", *CLI_FAST], input=f"/image {tmp_path / 'p.png'}\n")
    assert "text-only" in text_only.output


def test_a_checkpoint_without_a_vision_tower_says_so():
    # What `convert --text-only` writes: config.json without vision_config.
    from mlx_diffusiongemma.images import prepare_for
    from mlx_diffusiongemma.models import Model, ModelArgs

    model = Model(ModelArgs.from_config(tiny_config(CANVAS, vision=False)))
    one_line_error(lambda: prepare_for(model, [picture(8, 8)]), "no vision tower", "vision_config")
    one_line_error(lambda: model.embed_images(small_images(1)), "no vision tower")


def test_expanded_prompt_ids_equal_the_reference_processor(chat_model, monkeypatch):
    # transformers' Gemma4Processor itself, on our test tokenizer (its audio and video
    # processors need torchvision, so the class check that asks for them is bypassed).
    from transformers import PreTrainedTokenizerFast, processing_utils
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    path, model, _, ids = chat_model
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                              "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"})
    monkeypatch.setattr(processing_utils.ProcessorMixin, "check_argument_for_proper_class", lambda *a: None)
    proc = Gemma4Processor(feature_extractor=None, image_processor=processor(), tokenizer=tok, video_processor=None)
    images = [picture(*IMAGES[k], seed=i) for i, k in enumerate(("tall", "rgba", "grayscale"))]
    text = "Compare <|image|> and <|image|><|image|> now"
    theirs = proc(text=[text], images=[images], return_tensors="np")
    prepared = [prepare_image(img, BUDGET, patch_size=PATCH) for img in images]
    ours = expand_image_tokens(tok.encode(text), prepared, ids["image"], ids["boi"], ids["eoi"])
    assert ours == theirs["input_ids"][0].tolist()
    assert [int(t == ids["image"]) for t in ours] == theirs["mm_token_type_ids"][0].tolist()
    for image, pixels in zip(prepared, theirs["pixel_values"]):
        assert np.array_equal(image.pixels, pixels[: image.pixels.shape[0]])


def test_remote_images_only_when_allowed(tmp_path):
    import functools
    import http.server
    import threading

    from mlx_diffusiongemma.images import load_image

    picture(20, 30, seed=3).save(tmp_path / "p.png")
    (tmp_path / "text.png").write_bytes(b"hello")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        one_line_error(lambda: load_image(f"{url}/p.png"), "remote images are not fetched")
        assert load_image(f"{url}/p.png", allow_remote=True).size == (30, 20)
        one_line_error(lambda: load_image(f"{url}/missing.png", allow_remote=True), "cannot fetch", "404")
        one_line_error(lambda: load_image(f"{url}/text.png", allow_remote=True), "not an image")
    finally:
        server.shutdown()
