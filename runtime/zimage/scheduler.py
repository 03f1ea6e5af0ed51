"""Flow-matching Euler sampling (diffusers `FlowMatchEulerDiscreteScheduler`), parameters from the
stored scheduler/scheduler_config.json.

Z-Image's pipeline passes sigmas = linspace(1, 1/n, n); the scheduler shifts them (statically by
`shift`, or by `mu` from the image size when `use_dynamic_shifting`), appends 0, and
timesteps = sigmas * num_train_timesteps. The transformer gets (1000 - timestep) / 1000. All in
float32 like the reference, so the same noise gives the same latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import BadRequest, UnsupportedModel

# Options of the diffusers scheduler this runtime does not implement: refuse rather than ignore.
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling")


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        name = d.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise UnsupportedModel(f"scheduler {name!r} is not supported (FlowMatchEulerDiscreteScheduler is)")
        on = [k for k in _UNSUPPORTED if d.get(k)]
        if on:
            raise UnsupportedModel(f"scheduler_config.json sets {', '.join(on)}, which zreg does not implement")
        if d.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise UnsupportedModel(f"scheduler time_shift_type {d['time_shift_type']!r} is not supported")
        known = {f: d[f] for f in cls.__dataclass_fields__ if d.get(f) is not None}
        return cls(**known)


def calculate_shift(image_seq_len: int, cfg: SchedulerConfig) -> float:
    """The pipeline's mu for dynamic shifting (linear in the number of image tokens)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray      # float32 [n + 1], ending in 0
    timesteps: np.ndarray   # float32 [n]: sigmas[:-1] * num_train_timesteps

    @property
    def model_times(self) -> np.ndarray:
        """What the transformer gets: (1000 - timestep) / 1000, in float32 as the pipeline."""
        return (np.float32(1000) - self.timesteps) / np.float32(1000)

    def step(self, latents, velocity, i: int):
        """Euler: x + (sigma_{i+1} - sigma_i) * v (v is the negated model output)."""
        dt = np.float32(self.sigmas[i + 1] - self.sigmas[i])
        return latents + dt.item() * velocity


def schedule(cfg: SchedulerConfig, steps: int, image_seq_len: int) -> Schedule:
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, cfg)
        if cfg.time_shift_type == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    if cfg.shift_terminal:
        if steps < 2:
            raise BadRequest("this model's scheduler (shift_terminal) needs at least 2 steps")
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    sigmas = np.asarray(sigmas, dtype=np.float32)
    timesteps = sigmas * np.float32(cfg.num_train_timesteps)
    return Schedule(sigmas=np.append(sigmas, np.float32(0)), timesteps=timesteps)
