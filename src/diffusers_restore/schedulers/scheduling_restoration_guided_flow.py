# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""``RestorationGuidedFlowScheduler``: flow-matching Euler with SUPIR's restoration-guided sampling.

Conventions (diffusers' flow matching): sigma in [0, 1], sigma = 1 is pure noise,
``x_t = (1 - sigma) * x0 + sigma * noise``; the model predicts the velocity ``v = noise - x0``, so the clean-image
estimate is ``x0_hat = x_t - sigma * v``. The timestep given to the model is ``sigma * num_train_timesteps``.

One step, from ``sigma`` to ``sigma_next``, with ``z_lq`` the latent of the degraded image (``condition_latents``)::

    x0_hat = x_t - sigma * v
    k      = restoration_guidance_strength(sigma, sigma_next)    # 0 when guidance is off or below the threshold
    x0_hat = x0_hat - k * (x0_hat - z_lq)                         # pull the x0 estimate toward the degraded latent
    v'     = (x_t - x0_hat) / sigma                               # the velocity that points at the guided estimate
    x_next = x_t + (sigma_next - sigma) * v'                      # Euler

``k = min(1, (s(sigma) / s_max) ** tau_r)`` while ``s(sigma_next) > restoration_guidance_sigma_min``, else 0. This is
SUPIR's restoration-guided sampling (Yu et al., CVPR 2024), which pulls the *denoised estimate* (not ``x_{t-1}``)
toward the low-quality latent: fully at the highest noise, fading to nothing as the noise goes. ``s`` is the noise
level in the units chosen by ``restoration_guidance_sigma_type``:

- ``"edm"`` (default): ``s = sigma / (1 - sigma)``, the EDM noise level of the same signal-to-noise ratio, which is
  what SUPIR uses. ``s_max`` is the EDM sigma of the schedule's first sigma, clipped at SDXL's (and SUPIR's)
  ``14.6146`` (flow sigma 0.936), because the first flow sigma is usually 1 (EDM sigma infinite) and a clip near 1
  would make ``s_max`` so large that guidance dies after the first step. With this reference, ``tau_r`` and the
  threshold mean exactly what they mean in SUPIR (same ``k`` at the same noise level). Steps noisier than
  ``s_max`` get ``k = 1``: they walk ``x_t`` along the straight path from the noise to ``z_lq``, so sampling
  reaches flow sigma 0.936 at ``z_lq`` noised to that level, as SUPIR's first step does.
- ``"flow"``: ``s = sigma`` and ``s_max`` the schedule's first sigma. With SANA's shift 3 most steps sit at high
  sigma, so ``k`` stays large for many steps (tau_r 4, 20 steps: ``k > 0.5`` for the first 7 steps, against 4 in
  EDM units) and the result stays closer to the degraded input.

With ``tau_r = 0`` (the default, as in SUPIR's released settings) or without ``condition_latents``, the scheduler is
plain flow-matching Euler and reproduces ``FlowMatchEulerDiscreteScheduler`` bit for bit (in fp32).

The scheduler shares every config key of ``FlowMatchEulerDiscreteScheduler``, so ``from_config`` works in both
directions, and it keeps the ``flow_shift`` of the DPM-Solver configs that SANA checkpoints ship (which diffusers
would otherwise drop, silently sampling with shift 1). Starting part-way down the schedule (img2img `strength`) uses
the inherited ``set_begin_index`` and ``scale_noise``, as diffusers' img2img pipelines do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

# Pipeline loading looks the names `SchedulerMixin` / `ConfigMixin` up in a component's module, so they are imported
# here even though the class gets them through FlowMatchEulerDiscreteScheduler.
from diffusers import ConfigMixin, FlowMatchEulerDiscreteScheduler, SchedulerMixin  # noqa: F401
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

# SDXL's largest EDM sigma (the discretization SUPIR samples on): the upper clip of the EDM guidance reference.
SUPIR_EDM_SIGMA_MAX = 14.6146



@dataclass
class RestorationGuidedFlowSchedulerOutput(FlowMatchEulerDiscreteSchedulerOutput):
    """
    Output of [`RestorationGuidedFlowScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The sample at the next (lower) sigma, `x_{t-1}`: the input of the next denoising step.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The clean-latent estimate `x0_hat` the step moved toward, after restoration guidance when it was applied.
    """

    pred_original_sample: torch.Tensor


def _given(config: dict[str, Any], key: str) -> bool:
    """Whether `config` sets `key` itself (keys that fell back to a default are listed in `_use_default_values`)."""
    return key in config and key not in config.get("_use_default_values", [])


def _shift_from_flow_shift(config: dict[str, Any]) -> float | None:
    """The `flow_shift` of a DPM-Solver/UniPC flow config that has no `shift` of its own, else None."""
    if _given(config, "flow_shift") and not _given(config, "shift"):
        return float(config["flow_shift"])
    return None


class RestorationGuidedFlowScheduler(FlowMatchEulerDiscreteScheduler):
    r"""
    Flow-matching Euler scheduler with restoration guidance toward the degraded image's latent (SUPIR, moved to flow
    matching). See the module docstring for the algorithm and the conventions.

    It is a [`SchedulerMixin`] and [`ConfigMixin`] (through [`FlowMatchEulerDiscreteScheduler`], whose timesteps,
    sigmas, `set_timesteps`, `scale_noise`, `set_begin_index` and `index_for_timestep` it keeps unchanged), so it is a
    drop-in replacement: `RestorationGuidedFlowScheduler.from_config(pipe.scheduler.config)` and back.

    Args:
        num_train_timesteps (`int`, defaults to 1000): Number of training timesteps; the model sees
            `sigma * num_train_timesteps`.
        shift (`float`, defaults to 1.0): Static timestep shift `sigma' = shift * sigma / (1 + (shift - 1) * sigma)`.
            SANA uses 3.0 at 512/1024 px. Configs carrying `flow_shift` (SANA's DPM-Solver) and no `shift` use it.
        use_dynamic_shifting (`bool`, defaults to False): Shift by resolution; `set_timesteps` then needs `mu`.
        base_shift (`float`, defaults to 0.5): Dynamic shifting's shift at `base_image_seq_len`.
        max_shift (`float`, defaults to 1.15): Dynamic shifting's shift at `max_image_seq_len`.
        base_image_seq_len (`int`, defaults to 256): Sequence length of `base_shift`.
        max_image_seq_len (`int`, defaults to 4096): Sequence length of `max_shift`.
        invert_sigmas (`bool`, defaults to False): Mochi's inverted schedule. Kept for config parity; restoration
            guidance rejects it (it assumes sigma = 1 is noise).
        shift_terminal (`float`, *optional*): Stretch the shifted schedule to end at this sigma.
        use_karras_sigmas (`bool`, defaults to False): Karras spacing of the sigmas.
        use_exponential_sigmas (`bool`, defaults to False): Exponential spacing of the sigmas.
        use_beta_sigmas (`bool`, defaults to False): Beta-distribution spacing of the sigmas (needs scipy).
        time_shift_type (`str`, defaults to `"exponential"`): `"exponential"` or `"linear"` dynamic shifting.
        stochastic_sampling (`bool`, defaults to False): Re-noise the (guided) x0 estimate to `sigma_next` with fresh
            noise instead of the deterministic Euler step.
        restoration_guidance_tau (`float`, defaults to 0.0): SUPIR's `tau_r` (`restore_cfg`): the exponent of
            `k = (s / s_max) ** tau_r`. 0 turns guidance off (SUPIR's released default); SUPIR's yaml uses 4.0.
            Larger values make the pull fade faster. Can be overridden per call in `step`.
        restoration_guidance_sigma_min (`float`, defaults to 0.05): Guidance stops once the *next* sigma is at or
            below this value, in the units of `restoration_guidance_sigma_type` (SUPIR's `restore_cfg_s_tmin` is
            0.05 in EDM units, about 0.048 in flow units).
        restoration_guidance_sigma_type (`str`, defaults to `"edm"`): The noise level `k` and the threshold are
            measured in: `"edm"` (`sigma / (1 - sigma)`, SUPIR's units, so SUPIR's `tau_r` and threshold carry over
            unchanged) or `"flow"` (`sigma` itself; stronger and longer guidance on shifted schedules).
    """

    # DPMSolverMultistepScheduler is listed because SANA checkpoints ship it (with flow sigmas): its keys are then kept
    # as hidden config entries (so converting back to it keeps `flow_shift`) without an "unexpected keys" warning.
    _compatibles = ["FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        restoration_guidance_tau: float = 0.0,
        restoration_guidance_sigma_min: float = 0.05,
        restoration_guidance_sigma_type: Literal["edm", "flow"] = "edm",
    ):
        # Every key is passed on by name: FlowMatchEulerDiscreteScheduler's own `register_to_config` would otherwise
        # record the missing ones as defaults and overwrite this class's `_use_default_values`.
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )
        self._check_tau(restoration_guidance_tau, "restoration_guidance_tau")
        if not (math.isfinite(restoration_guidance_sigma_min) and restoration_guidance_sigma_min >= 0):
            raise ValueError(
                f"`restoration_guidance_sigma_min` must be a finite number >= 0, got {restoration_guidance_sigma_min}."
            )
        if restoration_guidance_sigma_type not in ("edm", "flow"):
            raise ValueError(
                f"`restoration_guidance_sigma_type` must be 'edm' or 'flow', got {restoration_guidance_sigma_type!r}."
            )
        self.num_inference_steps: int | None = None  # set by `set_timesteps`

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_config(
        cls, config: FrozenDict | dict[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any
    ):
        r"""
        Instantiate the scheduler from another scheduler's config (see [`ConfigMixin.from_config`]).

        Unlike the base implementation, a config that carries `flow_shift` (DPM-Solver / UniPC flow configs, as SANA
        checkpoints ship) and no `shift` of its own gives `shift=flow_shift` instead of silently falling back to
        1.0. An explicit `shift=` keyword always wins. `from_pretrained` goes through this method, so loading a
        folder holding such a config keeps the shift too. A folder path (diffusers' deprecated form) is loaded with
        `from_pretrained`.
        """
        if isinstance(config, (str, os.PathLike)):
            return cls.from_pretrained(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if isinstance(config, dict) and "shift" not in kwargs:
            flow_shift = _shift_from_flow_shift(config)
            if flow_shift is not None:
                kwargs["shift"] = flow_shift
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_sana_config(
        cls, config_or_path: FrozenDict | dict[str, Any] | str | os.PathLike, **kwargs: Any
    ) -> "RestorationGuidedFlowScheduler":
        r"""
        Build the scheduler from the scheduler config of a SANA checkpoint.

        SANA's diffusers checkpoints ship `DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
        prediction_type="flow_prediction")`; their `flow_shift` becomes `shift`. Flow-matching Euler configs (with
        `shift`) work as well. Configs of a non-flow model (`prediction_type` other than `"flow_prediction"`, or
        `use_flow_sigmas=False`) are rejected: this scheduler would produce garbage with them.

        Args:
            config_or_path (`dict`, `FrozenDict`, `str` or `os.PathLike`):
                A scheduler config (`pipe.scheduler.config`), a scheduler folder holding `scheduler_config.json`, a
                pipeline folder with a `scheduler/` subfolder, or the path of the JSON file itself. Local only: for a
                Hub repository use `from_pretrained(repo_id, subfolder="scheduler")`, which keeps `flow_shift` too.
            kwargs:
                Config values that override the loaded ones, e.g. `restoration_guidance_tau=4.0` or `shift=6.0`.

        Returns:
            [`RestorationGuidedFlowScheduler`]
        """
        if isinstance(config_or_path, (str, os.PathLike)):
            config = cls.load_config(cls._sana_config_file(config_or_path))
        elif isinstance(config_or_path, dict):
            config = config_or_path
        else:
            raise ValueError(
                "`config_or_path` must be a scheduler config dict or the path of a local scheduler folder / "
                f"{cls.config_name}, got {type(config_or_path).__name__}."
            )
        if _given(config, "prediction_type") and config["prediction_type"] != "flow_prediction":
            raise ValueError(
                f"`config_or_path` is not a flow-matching config: prediction_type={config['prediction_type']!r} "
                "(SANA uses 'flow_prediction')."
            )
        if _given(config, "use_flow_sigmas") and not config["use_flow_sigmas"]:
            raise ValueError("`config_or_path` is not a flow-matching config: use_flow_sigmas=False (SANA uses True).")
        return cls.from_config(config, **kwargs)

    @classmethod
    def _sana_config_file(cls, path: str | os.PathLike) -> str:
        """The scheduler config file of a local folder or file path, or a ValueError naming what is missing."""
        path = Path(path)
        if path.is_file():
            return str(path)
        if path.is_dir():
            for candidate in (path / cls.config_name, path / "scheduler" / cls.config_name):
                if candidate.is_file():
                    return str(candidate)
            raise ValueError(
                f"`config_or_path` {str(path)!r} has no {cls.config_name} (looked in the folder and in its "
                "scheduler/ subfolder)."
            )
        raise ValueError(
            f"`config_or_path` {str(path)!r} is not an existing local folder or file. For a Hub repository use "
            f"{cls.__name__}.from_pretrained(repo_id, subfolder='scheduler')."
        )

    # ------------------------------------------------------------------------------------------------ guidance

    @staticmethod
    def _check_tau(tau: float, name: str) -> float:
        tau = float(tau)
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"`{name}` must be a finite number >= 0 (0 turns guidance off), got {tau}.")
        return tau

    def _check_not_inverted(self, what: str) -> None:
        if self.config.invert_sigmas:
            raise ValueError(
                f"{what} assumes sigma = 1 is noise and 0 is clean; it does not support `invert_sigmas=True`."
            )

    def _noise_level(self, sigma: float) -> float:
        """A flow sigma in the units of `restoration_guidance_sigma_type` (EDM: sigma / (1 - sigma), inf at 1)."""
        if self.config.restoration_guidance_sigma_type == "flow":
            return sigma
        return math.inf if sigma >= 1.0 else sigma / (1.0 - sigma)

    def _noise_level_max(self) -> float:
        """Reference level `s_max` where k reaches 1: the schedule's first sigma (EDM: clipped at SDXL's 14.6146)."""
        first_sigma = float(self.sigmas[0])  # 1.0 before `set_timesteps` (the training grid)
        if self.config.restoration_guidance_sigma_type == "flow":
            return first_sigma
        return min(self._noise_level(first_sigma), SUPIR_EDM_SIGMA_MAX)

    def restoration_guidance_strength(
        self,
        sigma: float | torch.Tensor,
        sigma_next: float | torch.Tensor | None = None,
        restoration_guidance_tau: float | None = None,
    ) -> float:
        r"""
        The weight `k` in `x0_hat <- x0_hat - k * (x0_hat - z_lq)` for a step from `sigma` (flow units) to
        `sigma_next`; this is exactly what `step` applies.

        `k = min(1, (s(sigma) / s_max) ** tau_r)`, with `s` and `s_max` in the units of
        `restoration_guidance_sigma_type` (see the class docstring; `s_max` comes from the current schedule's first
        sigma, or 1.0 before `set_timesteps`). `k` is 0 when `tau_r` is 0, when `sigma <= 0`, or when `sigma_next`
        is given and `s(sigma_next) <= restoration_guidance_sigma_min`.

        Args:
            sigma (`float` or 0-d `torch.Tensor`): Flow sigma of the current step.
            sigma_next (`float` or 0-d `torch.Tensor`, *optional*): Flow sigma after the step (None: no threshold).
            restoration_guidance_tau (`float`, *optional*): Overrides the configured `restoration_guidance_tau`.

        Returns:
            `float` in [0, 1].
        """
        self._check_not_inverted("Restoration guidance")
        if restoration_guidance_tau is None:
            restoration_guidance_tau = self.config.restoration_guidance_tau
        tau = self._check_tau(restoration_guidance_tau, "restoration_guidance_tau")
        sigma = float(sigma)
        if tau == 0.0 or sigma <= 0.0:
            return 0.0
        threshold = self.config.restoration_guidance_sigma_min
        if sigma_next is not None and self._noise_level(float(sigma_next)) <= threshold:
            return 0.0
        ratio = self._noise_level(sigma) / self._noise_level_max()
        return min(1.0, ratio**tau)

    # ------------------------------------------------------------------------------------------------ step

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        condition_latents: torch.Tensor | None = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        restoration_guidance_tau: float | None = None,
        return_dict: bool = True,
    ) -> RestorationGuidedFlowSchedulerOutput | tuple:
        r"""
        One Euler step from the current sigma to the next, with restoration guidance toward `condition_latents`.

        The maths runs in float32 whatever the dtypes of the inputs; both outputs are cast back to `sample`'s dtype
        and live on `sample`'s device. Without guidance (`tau_r = 0` or no `condition_latents`) the result equals
        `FlowMatchEulerDiscreteScheduler.step` bit for bit for float32 inputs. (For lower-precision inputs it is the
        float32 result rounded once, where the base class multiplies in the model's dtype and returns that dtype.)

        Args:
            model_output (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                The predicted velocity `v = noise - x0`.
            timestep (`float` or `torch.Tensor`):
                The current timestep, one of `scheduler.timesteps` (integer indices are rejected).
            sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                The current noisy latent `x_t`.
            condition_latents (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` or
                `(1, num_channels, height, width)`, *optional*):
                The degraded image's latent `z_lq` (same latent space and scaling as `sample`). None: no guidance.
            s_churn, s_tmin, s_tmax, s_noise (`float`):
                Accepted for signature compatibility with `FlowMatchEulerDiscreteScheduler.step`, which ignores them
                as well; Euler churn is not implemented.
            generator (`torch.Generator`, *optional*):
                Random generator for the fresh noise of `stochastic_sampling`.
            per_token_timesteps (`torch.Tensor`, *optional*):
                Not supported (raises ValueError when given); kept in the signature for compatibility.
            restoration_guidance_tau (`float`, *optional*):
                Overrides the configured `restoration_guidance_tau` for this step (0 turns guidance off). A positive
                value without `condition_latents` raises ValueError.
            return_dict (`bool`, defaults to True):
                Return a [`RestorationGuidedFlowSchedulerOutput`] or the tuple `(prev_sample, pred_original_sample)`.

        Returns:
            [`RestorationGuidedFlowSchedulerOutput`] or `tuple`: `prev_sample` (the latent at the next sigma) and
            `pred_original_sample` (the guided x0 estimate).
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)):
            raise ValueError(
                "`timestep` must be one of `scheduler.timesteps` (a float), not an integer index such as the counter "
                "of `enumerate(timesteps)`."
            )
        if per_token_timesteps is not None:
            raise ValueError(f"`per_token_timesteps` is not supported by {type(self).__name__}.")
        if restoration_guidance_tau is not None:
            tau = self._check_tau(restoration_guidance_tau, "restoration_guidance_tau")
            if tau > 0 and condition_latents is None:
                raise ValueError(
                    f"`restoration_guidance_tau`={tau} needs `condition_latents` (the degraded image's latent)."
                )
        if condition_latents is not None:
            condition_latents = self._check_condition_latents(condition_latents, sample)

        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index + 1 >= len(self.sigmas):
            raise ValueError(
                f"`step` was called more often than the schedule has steps ({len(self.sigmas) - 1}); call "
                "`set_timesteps` again to start a new denoising loop."
            )

        sigma = self.sigmas[self.step_index].to(sample.device)
        sigma_next = self.sigmas[self.step_index + 1].to(sample.device)
        x_t = sample.to(torch.float32)
        velocity = model_output.to(device=sample.device, dtype=torch.float32)

        x0_hat = x_t - sigma * velocity
        k = 0.0
        if condition_latents is not None:
            k = self.restoration_guidance_strength(sigma, sigma_next, restoration_guidance_tau)
        if k > 0.0:
            x0_hat = x0_hat - k * (x0_hat - condition_latents)
            velocity = (x_t - x0_hat) / sigma  # k > 0 implies sigma > 0

        if self.config.stochastic_sampling:
            noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
            prev_sample = (1.0 - sigma_next) * x0_hat + sigma_next * noise
        else:
            prev_sample = x_t + (sigma_next - sigma) * velocity

        self._step_index += 1
        prev_sample = prev_sample.to(sample.dtype)
        x0_hat = x0_hat.to(sample.dtype)
        if not return_dict:
            return (prev_sample, x0_hat)
        return RestorationGuidedFlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_hat)

    @staticmethod
    def _check_condition_latents(condition_latents: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """`condition_latents` as float32 on `sample`'s device, or a ValueError when its shape does not fit."""
        if not isinstance(condition_latents, torch.Tensor):
            raise ValueError(f"`condition_latents` must be a torch.Tensor, got {type(condition_latents).__name__}.")
        shape, expected = tuple(condition_latents.shape), tuple(sample.shape)
        fits = shape == expected or (len(shape) == len(expected) and shape[0] == 1 and shape[1:] == expected[1:])
        if not fits:
            raise ValueError(
                f"`condition_latents` has shape {shape} but `sample` has shape {expected}; they must match "
                "(or `condition_latents` may have a batch size of 1)."
            )
        return condition_latents.to(device=sample.device, dtype=torch.float32)
