"""One model's generations run on every rank of an `mx.distributed` launch in lockstep: rank
0 decides what to run and when to stop, the other ranks follow (the server across ranks).

A sharded forward is a sequence of collectives that every rank must enter in the same order,
so the followers run the same generation as rank 0 on the same inputs and stop at the same
event. Rank 0 sends each job as a message (`tell`/`hear`: JSON through two broadcasts, a
length and the bytes; an image's pixels as one more) and, before every event it asks for,
one flag that says whether the generation goes on (`lead`/`follow`): a client that goes
away, a stop string or a filled hole ends it on rank 0, and the flag ends it on every rank
at the same step.
"""

import json
from dataclasses import asdict

import mlx.core as mx
import numpy as np

from .generate import GenerationSettings
from .models.sharding import broadcast


def tell(group, message: dict | None) -> None:
    """Rank 0: send `message` (JSON-able; None for "nothing yet") to every rank."""
    data = b"" if message is None else json.dumps(message).encode()
    _send(group, data)


def hear(group) -> dict | None:
    """A follower: the next message rank 0 `tell`s (None for "nothing yet")."""
    data = _send(group, b"")
    return json.loads(data) if data else None


def _send(group, data: bytes) -> bytes:
    # Both broadcasts run on every rank; only rank 0's values count.
    n = int(broadcast(mx.array([len(data)], dtype=mx.int32), group).item())
    if n == 0:
        return b""
    mine = np.frombuffer(data, dtype=np.uint8).astype(np.int32) if data else np.zeros(n, dtype=np.int32)
    got = broadcast(mx.array(mine), group)
    return np.array(got).astype(np.uint8).tobytes()


def lead(stream, group):
    """Rank 0: yield `stream`'s events, telling the followers before each one that the
    generation goes on, and once it ends (finished, closed early or failed) that it does not."""
    try:
        while True:
            _flag(group, True)
            try:
                event = next(stream)
            except StopIteration:
                return
            yield event
    finally:
        stream.close()
        _flag(group, False)


def follow(stream, group):
    """A follower: yield `stream`'s events for as long as rank 0 `lead`s them. An error in
    the stream is raised once rank 0 has ended the generation too (the same inputs fail the
    same way on every rank, so rank 0 sends its end flag next)."""
    failed = None
    try:
        while _flag(group, False):
            try:
                event = next(stream)
            except StopIteration:
                continue
            except Exception as e:  # noqa: BLE001  (raised below, after the end flag)
                failed = e
                continue
            yield event
    finally:
        stream.close()
    if failed is not None:
        raise failed


def _flag(group, value: bool) -> bool:
    return bool(broadcast(mx.array([int(value)], dtype=mx.int32), group).item())


def image_message(image) -> dict:
    """A `PreparedImage` but for its pixels, which `tell_pixels` sends."""
    return dict(shape=list(image.pixels.shape), positions=image.positions.tolist(), grid=list(image.grid),
                soft_tokens=image.soft_tokens, digest=image.digest)


def tell_pixels(group, images) -> None:
    """Rank 0: send the pixels of the `images` whose `image_message`s it told."""
    for image in images:
        mx.eval(broadcast(mx.array(image.pixels), group))


def hear_images(group, messages: list[dict]) -> list:
    """A follower: the `PreparedImage`s of rank 0's `image_message`s, pixels heard."""
    from .images import PreparedImage

    out = []
    for m in messages:
        pixels = np.array(broadcast(mx.zeros(m["shape"], dtype=mx.float32), group))
        out.append(PreparedImage(pixels, np.array(m["positions"], dtype=np.int32), tuple(m["grid"]),
                                 m["soft_tokens"], m["digest"]))
    return out


def settings_message(s: GenerationSettings) -> dict:
    """`s` as JSON-able values."""
    return asdict(s)


def settings_from_message(message: dict) -> GenerationSettings:
    """The settings `settings_message` wrote."""
    return GenerationSettings().updated(**message)
