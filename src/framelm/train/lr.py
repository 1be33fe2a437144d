"""Learning-rate schedules as pure functions of the step (so a resumed run needs no scheduler state)."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak: float, schedule: str, warmup_fraction: float,
          final_ratio: float, wsd_decay_fraction: float = 0.2, wsd_decay_shape: str = "1-sqrt") -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly to `peak`, reaching it at the end of the warmup steps. Then:
    cosine decays to final_ratio * peak at the last step; wsd holds the peak and decays over
    the last `wsd_decay_fraction` of the steps, linearly or with the "1-sqrt" cooldown of
    Hägele et al. (2024), lr = peak - (peak - final) * sqrt(progress); constant stays at the peak.
    """
    # The last step is never a warmup step, so a decaying schedule always ends at the final ratio.
    warmup = min(round(warmup_fraction * total_steps), max(total_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    final = peak * final_ratio
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        last = max(total_steps - 1, 1)
        # A warmup that ends just before the last step leaves that step to be the whole decay.
        progress = (step - warmup) / (last - warmup) if last > warmup else 1.0
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "wsd":
        # At least one decay step, so that a short run still ends at the final ratio.
        decay_steps = max(round(wsd_decay_fraction * total_steps), 1) if wsd_decay_fraction else 0
        decay_start = total_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return peak
        # progress 1/decay_steps at the first decay step (already below the peak), 1 at the last
        progress = (step - decay_start + 1) / decay_steps
        drop = progress if wsd_decay_shape == "linear" else math.sqrt(progress)
        return peak - (peak - final) * drop
    raise ValueError(f"unknown lr schedule {schedule!r}")
