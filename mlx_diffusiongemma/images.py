"""Images for the vision tower: loaded safely, resized to the patch budget and cut into
patches as transformers' Gemma 4 image processor (its PIL backend) does.

`prepare_image` gives a `PreparedImage`: the patches, their grid positions and the number of
soft tokens the tower makes of them. `expand_image_tokens` widens each image placeholder of
a prompt into `boi`, one image token per soft token, `eoi` (what the reference processor
writes), and `prefix_keys` names every image token after its image's content so an encoder
cache is reused only when the images, not just the placeholder ids, are the same.
"""

import base64
import hashlib
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

# The budgets (soft tokens per image) Gemma 4 was trained with.
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280
PATCH_SIZE = 16
POOLING_KERNEL = 3
# Declared sizes above this are refused before any pixel is decoded (PIL's own bomb limit,
# at which it only warns).
MAX_IMAGE_PIXELS = 89_478_485
_REMOTE = ("http://", "https://", "ftp://", "s3://", "gs://")
MAX_DOWNLOAD_BYTES = 20_000_000
DOWNLOAD_TIMEOUT = 10.0


@dataclass(eq=False)
class PreparedImage:
    """One image as the tower takes it.

    `pixels` (N, 3 * patch**2) float32 in [0, 1], each row a patch laid out (row, column,
    channel); `positions` (N, 2) int32 (x, y) on the patch grid; `grid` (rows, columns) of
    patches; `soft_tokens` = N / pool**2; `digest` identifies the pixels.
    """

    pixels: np.ndarray
    positions: np.ndarray
    grid: tuple[int, int]
    soft_tokens: int
    digest: str


def aspect_ratio_preserving_size(height: int, width: int, patch_size: int, max_patches: int,
                                 pool: int) -> tuple[int, int]:
    """The largest (height, width), multiples of pool * patch_size, with the image's aspect
    ratio and at most `max_patches` patches (the reference's rule, edge cases included)."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pool * patch_size
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    longest = (max_patches // pool**2) * side
    # A very thin image rounds one side to zero: that side gets one block, the other as
    # many as its aspect ratio asks, up to the budget.
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        th, tw = min(int(math.floor(height / width)) * side, longest), side
    return th, tw


def load_image(source, allow_remote: bool = False):
    """A decoded PIL image in RGB from a path, a `data:` URL, a PIL image or a uint8 array
    ((H, W), (H, W, 1), (H, W, 3) or (H, W, 4)). Every failure is a one-line UserError.

    http(s) URLs are refused unless `allow_remote` (a server started to fetch them): then
    at most `MAX_DOWNLOAD_BYTES` are read, within `DOWNLOAD_TIMEOUT` seconds.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return _decoded(source, "the image")
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith(("http://", "https://")) and allow_remote:
            return _open(io.BytesIO(_download(text)), _short(text))
        if text.startswith(_REMOTE):
            raise UserError(f"{_short(text)}: remote images are not fetched; download it and give its path")
        if text.startswith("data:"):
            return _open(io.BytesIO(_data_url_bytes(text)), "the data: URL")
        return _open_path(Path(text))
    raise UserError(f"an image must be a path, a PIL image or a uint8 array, got {type(source).__name__}")


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def _download(url: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_DOWNLOAD_BYTES:
                raise UserError(f"{_short(url)}: {int(declared):,} bytes, over the {MAX_DOWNLOAD_BYTES:,}-byte limit")
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except UserError:
        raise
    except Exception as e:  # urllib raises URLError, HTTPError, timeouts, ValueError for bad URLs
        raise UserError(f"{_short(url)}: cannot fetch the image ({' '.join(str(e).split())})") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise UserError(f"{_short(url)}: over the {MAX_DOWNLOAD_BYTES:,}-byte limit")
    if not data:
        raise UserError(f"{_short(url)}: the server sent no bytes, not an image")
    return data


def _data_url_bytes(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise UserError("a data: URL image must look like data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise UserError("the data: URL image is not valid base64") from None


def _open_path(path: Path):
    from PIL import ImageOps

    if not path.exists():
        raise UserError(f"{path}: no such image file")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an image file")
    try:
        size = path.stat().st_size
        data = path.read_bytes() if size else b""
    except OSError as e:
        raise UserError(f"{path}: cannot read the image ({e.strerror or e})") from None
    if not data:
        raise UserError(f"{path} is empty (0 bytes), not an image")
    image = _open(io.BytesIO(data), str(path))
    # Photos store their orientation apart from the pixels; transformers' load_image
    # applies it too.
    return ImageOps.exif_transpose(image)


def _open(stream, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Sizes between PIL's warning and error limits are refused below, not warned about.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except UnidentifiedImageError:
        raise UserError(f"{name} is not an image PIL can read (PNG, JPEG, GIF, WebP, BMP, TIFF, ...)") from None
    except Image.DecompressionBombError:
        raise UserError(_bomb_message(name, None)) from None
    except OSError as e:
        raise UserError(f"{name}: cannot read the image ({e})") from None
    return _decoded(image, name)


def _bomb_message(name: str, size) -> str:
    dims = f" declares {size[0]} x {size[1]} pixels," if size else " declares too many pixels,"
    return f"{name}{dims} over the {MAX_IMAGE_PIXELS:,}-pixel limit; refusing to decode it"


def _decoded(image, name: str):
    """`image` decoded (its declared size checked first) and converted to RGB, any
    transparency composited onto white as the reference processor does."""
    from PIL import Image

    w, h = image.size
    if w * h > MAX_IMAGE_PIXELS:
        raise UserError(_bomb_message(name, (w, h)))
    if w == 0 or h == 0:
        raise UserError(f"{name} has no pixels ({w} x {h})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(_bomb_message(name, (w, h))) from None
    except (OSError, SyntaxError, ValueError) as e:
        # Truncated or corrupt data surfaces here, when the pixels are decoded.
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{name} is truncated or corrupt ({reason})") from None


def _from_array(array: np.ndarray):
    from PIL import Image

    if array.dtype != np.uint8:
        raise UserError(f"an image array must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise UserError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    return _decoded(Image.fromarray(np.ascontiguousarray(array)), "the image array")


def prepare_image(source, max_soft_tokens: int = DEFAULT_SOFT_TOKENS, patch_size: int = PATCH_SIZE,
                  pool: int = POOLING_KERNEL) -> PreparedImage:
    """Load `source` (see `load_image`) and cut it into patches for at most
    `max_soft_tokens` soft tokens, one of `SUPPORTED_SOFT_TOKENS`."""
    from PIL import Image

    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise UserError(f"the image budget must be one of {SUPPORTED_SOFT_TOKENS} soft tokens, got {max_soft_tokens}")
    image = load_image(source)
    w, h = image.size
    th, tw = aspect_ratio_preserving_size(h, w, patch_size, max_soft_tokens * pool**2, pool)
    if (th, tw) != (h, w):
        image = image.resize((tw, th), resample=Image.BICUBIC)
    # float64 then float32, as the reference rescales.
    pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    rows, cols = th // patch_size, tw // patch_size
    patches = pixels.reshape(rows, patch_size, cols, patch_size, 3).transpose(0, 2, 1, 3, 4)
    patches = np.ascontiguousarray(patches.reshape(rows * cols, -1))
    x, y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([x, y], axis=-1).reshape(-1, 2).astype(np.int32)
    digest = hashlib.sha256(f"{rows}x{cols}:".encode() + patches.tobytes()).hexdigest()
    return PreparedImage(patches, positions, (rows, cols), rows * cols // pool**2, digest)


def prepare_images(sources: Sequence, max_soft_tokens: int = DEFAULT_SOFT_TOKENS, patch_size: int = PATCH_SIZE,
                   pool: int = POOLING_KERNEL) -> list[PreparedImage]:
    """`prepare_image` for each source (prepared images pass through)."""
    if sources is None:
        return []
    if isinstance(sources, (str, Path, np.ndarray)) or not isinstance(sources, Sequence):
        sources = [sources]
    return [s if isinstance(s, PreparedImage) else prepare_image(s, max_soft_tokens, patch_size, pool)
            for s in sources]


def check_takes_images(model) -> None:
    """A one-line UserError unless `model` carries its vision tower."""
    if "vision_tower" in model.model.encoder:
        return
    if model.args.vision_config is None:
        raise UserError("this checkpoint has no vision tower (config.json has no vision_config), so it cannot take images")
    raise UserError("this model was loaded text-only (without its vision tower), so it cannot take images; "
                    "load it with text_only=False")


def prepare_for(model, sources) -> list[PreparedImage]:
    """`prepare_images` at the model's budget (config.json's vision_soft_tokens_per_image)
    and patch size, after checking that the model takes images."""
    check_takes_images(model)
    vision = model.args.vision_config
    return prepare_images(sources, model.args.vision_soft_tokens_per_image, vision.get("patch_size", PATCH_SIZE),
                          vision.get("pooling_kernel_size", POOLING_KERNEL))


def expand_for(model, ids: Sequence[int], images: Sequence[PreparedImage]) -> list[int]:
    """`expand_image_tokens` with the model's image token ids."""
    a = model.args
    return expand_image_tokens(ids, images, a.image_token_id, a.boi_token_id, a.eoi_token_id)


def expand_image_tokens(ids: Sequence[int], images: Sequence[PreparedImage], image_token_id: int,
                        boi_token_id: int, eoi_token_id: int) -> list[int]:
    """Each image placeholder of `ids` widened to boi, `soft_tokens` image tokens, eoi.

    A run of image tokens right after a boi is an image already expanded (a prompt cut
    from an expanded one, as a chat sends after its cached prefix): it is kept, and takes
    its image from `images` like a placeholder does.
    """
    ids = list(ids)
    out, images, i, found = [], list(images), 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            out.append(ids[i])
            i += 1
            continue
        image = images[found] if found < len(images) else None
        found += 1
        if i > 0 and ids[i - 1] == boi_token_id:
            end = i
            while end < len(ids) and ids[end] == image_token_id:
                end += 1
            if image is not None and end - i != image.soft_tokens:
                raise UserError(
                    f"the prompt holds an expanded image of {end - i} tokens for an image of "
                    f"{image.soft_tokens} soft tokens; give the images in the prompt's order"
                )
            out += ids[i:end]
            i = end
        else:
            if image is not None:
                out += [boi_token_id] + [image_token_id] * image.soft_tokens + [eoi_token_id]
            i += 1
    if found != len(images):
        raise UserError(
            f"the prompt has {found} image placeholder{'s' * (found != 1)} for {len(images)} "
            f"image{'s' * (len(images) != 1)}; give one image per placeholder"
        )
    return out


def image_runs(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive image tokens in `ids`."""
    runs, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == image_token_id and start is None:
            start = i
        elif t != image_token_id and start is not None:
            runs.append((start, i))
            start = None
    return runs


def images_after(ids: Sequence[int], images: Sequence[PreparedImage], image_token_id: int, start: int) -> list:
    """The `images` of `ids` (one per run of image tokens, in order) whose run begins at or
    after `start`: those a cache holding `ids[:start]` has not encoded yet."""
    return [image for (a, _), image in zip(image_runs(ids, image_token_id), images) if a >= start]


def prefix_keys(ids: Sequence[int], images: Sequence[PreparedImage], image_token_id: int) -> list:
    """`ids` with each image token replaced by (its image's digest, its index) and the boi
    token before it by (digest, -1): what a prompt cache compares, so a different image at
    the same place is not reused. Keying the boi too keeps a reused prefix from ending
    between a boi and its image tokens, where the rest would no longer read as an
    expanded image."""
    keys = list(ids)
    runs = image_runs(ids, image_token_id)
    for (start, end), image in zip(runs, images):
        keys[max(start - 1, 0) : end] = [(image.digest, j) for j in range(-1 if start else 0, end - start)]
    return keys
