"""The denoising loop of one canvas, as `generate_step` runs it.

A step is one decoder forward, then one compiled function over the vocabulary
(`capped_sampler_step`: softcap, temperature, softmax, entropy, draw, argmax, acceptance,
renoising), then one host read: a (B, 3) array holding what the loop and its events need
(accepted count, mean entropy, stopped). The tokens are those of the reference loop,
`generate._denoise_canvas` (kept for sharded models and as the test's baseline): the
same arithmetic, in the same order, from the same key chain.

What the loop no longer does: write the softcapped logits out before scaling them (the
cap is fused into the sampler's pass), evaluate a second graph for the accepted counts,
and read four arrays back. The shapes of every compiled piece are fixed per canvas shape
(B, canvas, vocab), so nothing is retraced across steps, canvases or turns.

`sampler="confidence"` (the fast mode's sampler, mlx-vlm's default rule): a position is
revealed once its sampled token has probability >= `threshold` and then held; the others
are renoised; the canvas stops once all are revealed (or on the usual stop test) and the
last step reveals whatever is left.
"""

import mlx.core as mx

from .canvas import StepEvent, fully_pinned_event, hold_revealed, open_canvas, sampler_start
from .sample import capped_sampler_step, free_mean, pin, reveal_confident, rows_stable, temperature


def denoise_canvas(model, cache: list, s, index: int, key: mx.array, pins, shape: tuple[int, int],
                   prompt_seconds: float | None):
    """Yield a StepEvent per step of one canvas of `shape` (B, L) until every row met its
    stop test; the last event's `argmax` holds each row's canvas as it stood when that row
    stopped. Returns the key chain's next key, the last event and the step at which each
    row stopped."""
    B, V = shape[0], model.args.vocab_size
    key, canvas, pinned, bias = open_canvas(model, s, key, pins, shape)
    if (event := fully_pinned_event(index, pins, B, prompt_seconds)) is not None:
        yield event
        return key, event, [0] * B
    bias = mx.array(0.0, dtype=mx.float32) if bias is None else bias
    cap = mx.array(model.args.final_logit_softcapping, dtype=mx.float32)
    confident = s.sampler == "confidence"
    bound, threshold, revealed, held = sampler_start(s, pins, pinned)
    scaled, probs, history = None, None, []
    final, done, steps = None, mx.zeros((B,), dtype=mx.bool_), [0] * B
    for n, cur_step in enumerate(range(s.max_denoising_steps, 0, -1), start=1):
        key, step_key = mx.random.split(key)
        raw = model.denoise(canvas, cache, scaled, self_conditioning_probs=probs, capped=False,
                            self_conditioning_top_k=s.self_conditioning_top_k or None)
        inv_t = mx.array(1.0 / temperature(cur_step, s.max_denoising_steps, s.t_min, s.t_max), dtype=mx.float32)
        keys = mx.random.split(step_key)
        scaled, probs, argmax, canvas, accepted, entropy = capped_sampler_step(
            raw, cap, bias, inv_t, bound, keys, pinned)
        if confident:
            # With every draw accepted, `canvas` holds the draws.
            accepted = reveal_confident(probs, canvas, revealed, threshold, mx.array(cur_step == 1))
            held, revealed, canvas, argmax = hold_revealed(accepted, canvas, argmax, revealed, held, V, keys[1])
        # Pins enter the canvas from its first renoising on; the first forward reads the
        # canvas as it started (see `GenerationSettings.pinned`).
        canvas, argmax = pin(canvas, pins), pin(argmax, pins)
        mean_entropy = free_mean(entropy, None if pins is None else pins.mask)
        stop = (mean_entropy < s.confidence_threshold) & rows_stable(argmax, history, s.stability_threshold)
        if confident:
            stop = stop | revealed.all(axis=-1)
        # A row keeps the canvas it stopped on; the rows still running carry on.
        final = argmax if final is None else mx.where(done[:, None], final, argmax)
        done = done | stop
        history = (history + [argmax])[-max(s.stability_threshold, 1):]
        report = mx.stack([accepted.sum(axis=-1).astype(mx.float32), mean_entropy, done.astype(mx.float32)], axis=-1)
        mx.eval(final, canvas, report, revealed, held)
        counts, entropies, stopped = zip(*report.tolist())
        event = StepEvent(index, n, final, [int(c) for c in counts], list(entropies), prompt_seconds=prompt_seconds)
        prompt_seconds = None
        yield event
        steps = [m or (n if d else 0) for m, d in zip(steps, stopped)]
        if all(steps):
            break
    return key, event, [m or n for m in steps]
