"""RestorationGuidedFlowScheduler: parity with FlowMatchEulerDiscreteScheduler, guidance, strength, loading."""

import inspect
import json
import logging
import math
from contextlib import contextmanager

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import logging as diffusers_logging

import diffusers_restore.schedulers.scheduling_restoration_guided_flow as module
from diffusers_restore import RestorationGuidedFlowScheduler, RestorationGuidedFlowSchedulerOutput

SHAPE = (2, 4, 8, 8)
NEW_KEYS = ("restoration_guidance_tau", "restoration_guidance_sigma_min", "restoration_guidance_sigma_type")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sana_dpm_scheduler():
    """The scheduler SANA's diffusers checkpoints ship."""
    return DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")


def _edm(sigma):
    return math.inf if sigma >= 1 else sigma / (1 - sigma)


@contextmanager
def _diffusers_warnings():
    """Collect the messages diffusers logs at WARNING and above (its loggers do not propagate to pytest)."""
    records = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = _Collect(level=logging.WARNING)
    root = diffusers_logging.get_logger("diffusers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def _run_loop(scheduler, x, velocities, **step_kwargs):
    """Full denoising loop with precomputed "model outputs"; returns final sample and every x0 estimate."""
    estimates = []
    for t, v in zip(scheduler.timesteps, velocities):
        out = scheduler.step(v, t, x, **step_kwargs)
        x = out.prev_sample
        estimates.append(out.pred_original_sample)
    return x, estimates


# ------------------------------------------------------------------------------------------------ API and parity


def test_class_is_a_diffusers_scheduler_with_the_flow_match_api():
    from diffusers import ConfigMixin, SchedulerMixin

    assert module.SchedulerMixin is SchedulerMixin and module.ConfigMixin is ConfigMixin  # looked up by pipelines
    assert issubclass(RestorationGuidedFlowScheduler, (SchedulerMixin, ConfigMixin))
    scheduler = RestorationGuidedFlowScheduler()
    assert scheduler.order == 1
    assert FlowMatchEulerDiscreteScheduler in scheduler.compatibles
    # retrieve_timesteps inspects these parameters
    assert list(inspect.signature(scheduler.set_timesteps).parameters) == list(
        inspect.signature(FlowMatchEulerDiscreteScheduler().set_timesteps).parameters
    )
    # every base step keyword is still accepted
    base_step = inspect.signature(FlowMatchEulerDiscreteScheduler.step).parameters
    assert set(base_step) <= set(inspect.signature(RestorationGuidedFlowScheduler.step).parameters)
    # every base config key is a named __init__ parameter (a **kwargs signature would lose them on reload)
    ours = inspect.signature(RestorationGuidedFlowScheduler.__init__).parameters
    assert set(FlowMatchEulerDiscreteScheduler().config) - {"_use_default_values"} <= set(ours)
    assert {k: v for k, v in scheduler.config.items() if k in NEW_KEYS} == {
        "restoration_guidance_tau": 0.0,
        "restoration_guidance_sigma_min": 0.05,
        "restoration_guidance_sigma_type": "edm",
    }


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_timesteps_and_sigmas_match_flow_match_euler(shift):
    ours, base = RestorationGuidedFlowScheduler(shift=shift), FlowMatchEulerDiscreteScheduler(shift=shift)
    assert torch.equal(ours.sigmas, base.sigmas) and torch.equal(ours.timesteps, base.timesteps)  # training grid
    for steps in (1, 7, 20):
        ours.set_timesteps(steps)
        base.set_timesteps(steps)
        assert torch.equal(ours.sigmas, base.sigmas) and torch.equal(ours.timesteps, base.timesteps)
        assert len(ours.timesteps) == steps and float(ours.sigmas[-1]) == 0.0


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_dynamic_shifting_with_mu_matches(time_shift_type):
    config = dict(use_dynamic_shifting=True, time_shift_type=time_shift_type)
    ours, base = RestorationGuidedFlowScheduler(**config), FlowMatchEulerDiscreteScheduler(**config)
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(10)
    ours.set_timesteps(10, mu=0.8)
    base.set_timesteps(10, mu=0.8)
    assert torch.equal(ours.sigmas, base.sigmas) and torch.equal(ours.timesteps, base.timesteps)


def test_custom_sigmas_timesteps_and_karras_match():
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    for config in (dict(shift=3.0), dict(shift=3.0, use_karras_sigmas=True), dict(shift_terminal=0.1)):
        ours, base = RestorationGuidedFlowScheduler(**config), FlowMatchEulerDiscreteScheduler(**config)
        for kwargs in (dict(sigmas=sigmas), dict(num_inference_steps=12)):
            ours.set_timesteps(**kwargs)
            base.set_timesteps(**kwargs)
            assert torch.equal(ours.sigmas, base.sigmas) and torch.equal(ours.timesteps, base.timesteps)
    ours, base = RestorationGuidedFlowScheduler(), FlowMatchEulerDiscreteScheduler()
    ours.set_timesteps(sigmas=sigmas, timesteps=[900.0, 700.0, 500.0, 300.0, 100.0])
    base.set_timesteps(sigmas=sigmas, timesteps=[900.0, 700.0, 500.0, 300.0, 100.0])
    assert torch.equal(ours.sigmas, base.sigmas) and torch.equal(ours.timesteps, base.timesteps)


@pytest.mark.parametrize(
    "config, step_kwargs",
    [
        (dict(restoration_guidance_tau=0.0), dict(condition_latents=_randn(*SHAPE, seed=9))),  # tau 0
        (dict(restoration_guidance_tau=4.0), {}),  # no condition
        (
            dict(restoration_guidance_tau=4.0),
            dict(condition_latents=_randn(*SHAPE, seed=9), restoration_guidance_tau=0),
        ),
        (dict(restoration_guidance_tau=0.0, restoration_guidance_sigma_type="flow"), {}),
    ],
)
def test_guidance_off_equals_flow_match_euler_bit_for_bit(config, step_kwargs):
    ours = RestorationGuidedFlowScheduler(shift=3.0, **config)
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(20)
    base.set_timesteps(20)
    x_ours = x_base = _randn(*SHAPE, seed=1)
    weight, bias = _randn(4, 4, seed=2), _randn(1, 4, 1, 1, seed=3)

    def model(x, t):  # a random "model": a channel mix plus a timestep-dependent bias
        return torch.einsum("dc,bchw->bdhw", weight, x) + bias * t / 1000

    for t in base.timesteps:
        x_ours = ours.step(model(x_ours, t), t, x_ours, **step_kwargs).prev_sample
        x_base = base.step(model(x_base, t), t, x_base).prev_sample
        assert torch.equal(x_ours, x_base)
    assert ours.step_index == base.step_index == 20


def test_stochastic_sampling_matches_with_the_same_generator():
    ours = RestorationGuidedFlowScheduler(shift=3.0, stochastic_sampling=True)
    base = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    ours.set_timesteps(6)
    base.set_timesteps(6)
    velocities = [_randn(*SHAPE, seed=10 + i) for i in range(6)]
    x_ours = x_base = _randn(*SHAPE, seed=1)
    g_ours, g_base = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t, v in zip(base.timesteps, velocities):
        x_ours = ours.step(v, t, x_ours, generator=g_ours).prev_sample
        x_base = base.step(v, t, x_base, generator=g_base).prev_sample
    assert torch.equal(x_ours, x_base)


def test_step_outputs_and_tuple_form():
    scheduler = RestorationGuidedFlowScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    x, v = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    t = scheduler.timesteps[0]
    out = scheduler.step(v, t, x)
    assert isinstance(out, RestorationGuidedFlowSchedulerOutput)
    sigma, sigma_next = scheduler.sigmas[0], scheduler.sigmas[1]
    assert torch.equal(out.pred_original_sample, x - sigma * v)
    assert torch.equal(out.prev_sample, x + (sigma_next - sigma) * v)
    scheduler.set_timesteps(5)
    prev, x0 = scheduler.step(v, t, x, return_dict=False)
    assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)


# ------------------------------------------------------------------------------------------------ analytic checks


def _exact_velocity(x_t, sigma, x0):
    """The true velocity on the straight path through x0: noise = (x_t - (1 - sigma) x0) / sigma, v = noise - x0."""
    noise = (x_t - (1 - sigma) * x0) / sigma
    return noise - x0


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(restoration_guidance_tau=4.0),
        dict(restoration_guidance_tau=1.0, restoration_guidance_sigma_type="flow"),
    ],
)
def test_exact_velocity_lands_on_x0_with_and_without_guidance(config):
    x0, noise = _randn(*SHAPE, seed=3), _randn(*SHAPE, seed=4)
    scheduler = RestorationGuidedFlowScheduler(shift=3.0, **config)
    scheduler.set_timesteps(20)
    step_kwargs = dict(condition_latents=x0) if config else {}  # guidance toward z_lq = x0 must not disturb it
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        out = scheduler.step(_exact_velocity(x, sigma, x0), t, x, **step_kwargs)
        torch.testing.assert_close(out.pred_original_sample, x0, rtol=0, atol=2e-5)
        x = out.prev_sample
    torch.testing.assert_close(x, x0, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------------------ guidance


def _reference_step(x, v, z, sigma, sigma_next, k):
    """The issue's formulas in float64."""
    x, v, z = x.double(), v.double(), z.double()
    x0 = x - sigma * v
    x0 = x0 - k * (x0 - z)
    v_guided = (x - x0) / sigma
    return x + (sigma_next - sigma) * v_guided, x0


@pytest.mark.parametrize("sigma_type", ["edm", "flow"])
def test_guidance_pulls_toward_condition_early_and_vanishes_late(sigma_type):
    guided = RestorationGuidedFlowScheduler(
        shift=3.0, restoration_guidance_tau=4.0, restoration_guidance_sigma_type=sigma_type
    )
    plain = RestorationGuidedFlowScheduler(shift=3.0)
    guided.set_timesteps(20)
    plain.set_timesteps(20)
    z = _randn(*SHAPE, seed=7)
    x = _randn(*SHAPE, seed=1)
    strengths = []
    for i, t in enumerate(plain.timesteps):
        v = _randn(*SHAPE, seed=100 + i)
        sigma, sigma_next = float(plain.sigmas[i]), float(plain.sigmas[i + 1])
        k = guided.restoration_guidance_strength(sigma, sigma_next)
        strengths.append(k)
        out_g = guided.step(v, t, x, condition_latents=z)
        out_p = plain.step(v, t, x)
        distance_g = (out_g.pred_original_sample - z).norm()
        distance_p = (out_p.pred_original_sample - z).norm()
        # x0_hat - z shrinks by exactly (1 - k); so does the step's pull: x_next moves toward z where k > 0
        torch.testing.assert_close(distance_g, (1 - k) * distance_p, rtol=1e-5, atol=1e-5)
        if k > 0:
            assert (out_g.prev_sample - z).norm() < (out_p.prev_sample - z).norm()
        else:
            assert torch.equal(out_g.prev_sample, out_p.prev_sample)
        expected_prev, expected_x0 = _reference_step(x, v, z, sigma, sigma_next, k)
        torch.testing.assert_close(out_g.prev_sample.double(), expected_prev, rtol=0, atol=1e-5)
        torch.testing.assert_close(out_g.pred_original_sample.double(), expected_x0, rtol=0, atol=1e-5)
        x = out_p.prev_sample  # both schedulers see the same state at every step
    assert strengths[0] == 1.0  # full pull at the first (noisiest) step: x0_hat = z_lq
    assert all(a >= b for a, b in zip(strengths, strengths[1:]))  # fades with the noise
    assert strengths[-1] == 0.0 and strengths[-2] == 0.0  # gone at the end (threshold, then sigma_next = 0)
    assert 0.0 < strengths[6] < 1.0


def test_guidance_strength_values_edm_and_flow():
    edm = RestorationGuidedFlowScheduler(shift=3.0, restoration_guidance_tau=4.0)
    flow = RestorationGuidedFlowScheduler(
        shift=3.0, restoration_guidance_tau=2.0, restoration_guidance_sigma_type="flow"
    )
    # before set_timesteps the reference is the training grid's first sigma, 1.0
    assert flow.restoration_guidance_strength(0.5) == pytest.approx(0.25)
    assert edm.restoration_guidance_strength(0.5) == pytest.approx((1.0 / 14.6146) ** 4)
    edm.set_timesteps(20)
    flow.set_timesteps(sigmas=[0.8, 0.6, 0.4, 0.2])  # shifted by 3 -> first sigma 12/13.8
    s0 = float(flow.sigmas[0])
    assert flow.restoration_guidance_strength(flow.sigmas[0]) == 1.0
    assert flow.restoration_guidance_strength(0.3) == pytest.approx((0.3 / s0) ** 2)
    sigmas = [float(s) for s in edm.sigmas]
    clipped = 14.6146 / 15.6146  # SUPIR's sigma_max in flow units
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        k = edm.restoration_guidance_strength(sigma, sigma_next)
        if _edm(sigma_next) <= 0.05:
            assert k == 0.0
        elif sigma >= clipped:
            assert k == 1.0
        else:
            assert k == pytest.approx((_edm(sigma) / 14.6146) ** 4, rel=1e-9)
    # tau from the call overrides the config; 0 and sigma <= 0 give nothing
    assert edm.restoration_guidance_strength(0.5, restoration_guidance_tau=1.0) == pytest.approx(1.0 / 14.6146)
    assert edm.restoration_guidance_strength(0.5, restoration_guidance_tau=0.0) == 0.0
    assert edm.restoration_guidance_strength(0.0) == 0.0
    # a schedule starting below SUPIR's sigma_max uses its own first sigma
    edm.set_timesteps(sigmas=[0.5, 0.25])
    assert edm.restoration_guidance_strength(float(edm.sigmas[0])) == 1.0


def test_threshold_stops_guidance():
    sigma_min = 0.5  # flow units here
    guided = RestorationGuidedFlowScheduler(
        shift=3.0,
        restoration_guidance_tau=1.0,
        restoration_guidance_sigma_type="flow",
        restoration_guidance_sigma_min=sigma_min,
    )
    plain = RestorationGuidedFlowScheduler(shift=3.0)
    guided.set_timesteps(20)
    plain.set_timesteps(20)
    z, x = _randn(*SHAPE, seed=7), _randn(*SHAPE, seed=1)
    guided_steps = 0
    for i, t in enumerate(plain.timesteps):
        v = _randn(*SHAPE, seed=100 + i)
        out_g = guided.step(v, t, x, condition_latents=z).prev_sample
        out_p = plain.step(v, t, x).prev_sample
        if float(plain.sigmas[i + 1]) > sigma_min:
            assert not torch.equal(out_g, out_p)
            guided_steps += 1
        else:
            assert torch.equal(out_g, out_p)
        x = out_p
    assert 0 < guided_steps < 20
    # in EDM units the threshold applies to sigma_next / (1 - sigma_next)
    edm = RestorationGuidedFlowScheduler(restoration_guidance_tau=1.0, restoration_guidance_sigma_min=1.0)
    assert edm.restoration_guidance_strength(0.9, sigma_next=0.49) == 0.0  # EDM 0.96
    assert edm.restoration_guidance_strength(0.9, sigma_next=0.51) > 0.0  # EDM 1.04


def test_per_call_tau_matches_config_tau_and_condition_broadcasts():
    configured = RestorationGuidedFlowScheduler(shift=3.0, restoration_guidance_tau=2.0)
    per_call = RestorationGuidedFlowScheduler(shift=3.0)
    configured.set_timesteps(8)
    per_call.set_timesteps(8)
    z_one = _randn(1, *SHAPE[1:], seed=7)
    velocities = [_randn(*SHAPE, seed=20 + i) for i in range(8)]
    x_a, est_a = _run_loop(configured, _randn(*SHAPE, seed=1), velocities, condition_latents=z_one.expand(SHAPE))
    x_b, est_b = _run_loop(
        per_call, _randn(*SHAPE, seed=1), velocities, condition_latents=z_one, restoration_guidance_tau=2
    )
    assert torch.equal(x_a, x_b)
    assert all(torch.equal(a, b) for a, b in zip(est_a, est_b))
    plain = RestorationGuidedFlowScheduler(shift=3.0)
    plain.set_timesteps(8)
    x_c, _ = _run_loop(plain, _randn(*SHAPE, seed=1), velocities)
    assert not torch.equal(x_a, x_c)


def test_bf16_in_bf16_out_with_float32_maths():
    scheduler = RestorationGuidedFlowScheduler(shift=3.0, restoration_guidance_tau=1.0)
    scheduler.set_timesteps(10)
    x, v, z = (_randn(*SHAPE, seed=s).to(torch.bfloat16) for s in (1, 2, 3))
    t = scheduler.timesteps[2]
    scheduler.set_begin_index(2)
    out = scheduler.step(v, t, x, condition_latents=z)
    assert out.prev_sample.dtype == out.pred_original_sample.dtype == torch.bfloat16
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(2)
    reference = scheduler.step(v.float(), t, x.float(), condition_latents=z.float())
    assert torch.equal(out.prev_sample, reference.prev_sample.to(torch.bfloat16))
    assert torch.equal(out.pred_original_sample, reference.pred_original_sample.to(torch.bfloat16))
    # a float32 sample with a bf16 model output stays float32
    scheduler.set_timesteps(10)
    assert scheduler.step(v, scheduler.timesteps[0], x.float()).prev_sample.dtype == torch.float32


def test_deterministic():
    def run():
        scheduler = RestorationGuidedFlowScheduler(shift=3.0, restoration_guidance_tau=4.0, stochastic_sampling=True)
        scheduler.set_timesteps(5)
        velocities = [_randn(*SHAPE, seed=30 + i) for i in range(5)]
        return _run_loop(
            scheduler, _randn(*SHAPE, seed=1), velocities, condition_latents=_randn(*SHAPE, seed=2),
            generator=torch.Generator().manual_seed(3),
        )[0]

    assert torch.equal(run(), run())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_on_cuda_with_sigmas_on_cpu():
    scheduler = RestorationGuidedFlowScheduler(shift=3.0, restoration_guidance_tau=4.0)
    scheduler.set_timesteps(4)  # sigmas stay on the CPU
    x, v = _randn(*SHAPE, seed=1).cuda(), _randn(*SHAPE, seed=2).cuda()
    out = scheduler.step(v, scheduler.timesteps[0], x, condition_latents=_randn(*SHAPE, seed=3))
    assert out.prev_sample.device.type == "cuda"


# ------------------------------------------------------------------------------------------------ img2img start


def test_starting_part_way_down_the_schedule_as_img2img_pipelines_do():
    """diffusers' img2img sequence (`strength` = fraction of the schedule): skip the first steps with
    `set_begin_index`, start from `scale_noise` of the degraded latent; guidance and Euler still land on x0."""
    scheduler = RestorationGuidedFlowScheduler(shift=3.0, restoration_guidance_tau=4.0)
    scheduler.set_timesteps(20)
    sigmas = scheduler.sigmas
    t_start = int(20 - 20 * 0.5)
    timesteps = scheduler.timesteps[t_start:]
    scheduler.set_begin_index(t_start)
    z_lq, x0, noise = _randn(*SHAPE, seed=5), _randn(*SHAPE, seed=3), _randn(*SHAPE, seed=4)
    latents = scheduler.scale_noise(z_lq, timesteps[:1], noise)
    sigma_start = sigmas[t_start]
    torch.testing.assert_close(latents, (1 - sigma_start) * z_lq + sigma_start * noise, rtol=0, atol=1e-6)
    for i, t in enumerate(timesteps):
        sigma = float(sigmas[t_start + i])
        latents = scheduler.step(_exact_velocity(latents, sigma, x0), t, latents, condition_latents=z_lq).prev_sample
    assert scheduler.step_index == 20
    # guidance pulls toward z_lq while the noise is high, then the exact velocity brings the sample back onto x0
    torch.testing.assert_close(latents, x0, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------------------ loading


def test_save_pretrained_round_trip(tmp_path):
    scheduler = RestorationGuidedFlowScheduler(
        shift=3.0,
        restoration_guidance_tau=4.0,
        restoration_guidance_sigma_min=0.1,
        restoration_guidance_sigma_type="flow",
    )
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "RestorationGuidedFlowScheduler" and saved["restoration_guidance_tau"] == 4.0
    with _diffusers_warnings() as warnings:
        loaded = RestorationGuidedFlowScheduler.from_pretrained(tmp_path)
    assert warnings == []
    strip = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert strip(loaded.config) == strip(scheduler.config)
    loaded.set_timesteps(10)
    scheduler.set_timesteps(10)
    assert torch.equal(loaded.sigmas, scheduler.sigmas)


def test_from_config_round_trips_with_flow_match_euler(tmp_path):
    base = FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True)
    ours = RestorationGuidedFlowScheduler.from_config(base.config)
    assert ours.config.shift == 3.0 and ours.config.use_karras_sigmas
    assert ours.config.restoration_guidance_tau == 0.0 and ours.config.restoration_guidance_sigma_type == "edm"

    ours = RestorationGuidedFlowScheduler.from_config(base.config, restoration_guidance_tau=4.0, shift=2.0)
    assert ours.config.shift == 2.0 and ours.config.restoration_guidance_tau == 4.0
    back = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    assert back.config.shift == 2.0 and back.config.use_karras_sigmas

    base.save_pretrained(tmp_path)  # a flow-matching folder loads into ours, without warnings
    with _diffusers_warnings() as warnings:
        ours = RestorationGuidedFlowScheduler.from_pretrained(tmp_path)
    assert warnings == []
    assert ours.config.shift == 3.0


def test_sana_dpm_solver_config_keeps_its_shift(tmp_path):
    dpm = _sana_dpm_scheduler()
    pipeline_dir = tmp_path / "pipeline"
    dpm.save_pretrained(pipeline_dir / "scheduler")
    folder = pipeline_dir / "scheduler"
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(20)

    with _diffusers_warnings() as warnings:
        loaded = {
            "from_pretrained": RestorationGuidedFlowScheduler.from_pretrained(folder),
            "from_pretrained subfolder": RestorationGuidedFlowScheduler.from_pretrained(
                pipeline_dir, subfolder="scheduler"
            ),
            "from_config (file)": RestorationGuidedFlowScheduler.from_config(
                RestorationGuidedFlowScheduler.load_config(folder)
            ),
            "from_config (FrozenDict)": RestorationGuidedFlowScheduler.from_config(dpm.config),
            "from_config (folder path)": RestorationGuidedFlowScheduler.from_config(str(folder)),
            "from_sana_config (dict)": RestorationGuidedFlowScheduler.from_sana_config(dict(dpm.config)),
            "from_sana_config (FrozenDict)": RestorationGuidedFlowScheduler.from_sana_config(dpm.config),
            "from_sana_config (folder)": RestorationGuidedFlowScheduler.from_sana_config(folder),
            "from_sana_config (pipeline folder)": RestorationGuidedFlowScheduler.from_sana_config(str(pipeline_dir)),
            "from_sana_config (json)": RestorationGuidedFlowScheduler.from_sana_config(
                folder / "scheduler_config.json"
            ),
        }
    assert warnings == []
    for route, scheduler in loaded.items():
        assert scheduler.config.shift == 3.0, route
        scheduler.set_timesteps(20)
        assert torch.equal(scheduler.sigmas, reference.sigmas), route

    # keyword arguments still win, and converting back to DPM-Solver keeps its flow settings
    tuned = RestorationGuidedFlowScheduler.from_sana_config(folder, shift=6.0, restoration_guidance_tau=4.0)
    assert tuned.config.shift == 6.0 and tuned.config.restoration_guidance_tau == 4.0
    back = DPMSolverMultistepScheduler.from_config(loaded["from_pretrained"].config)
    assert back.config.flow_shift == 3.0 and back.config.use_flow_sigmas
    assert back.config.prediction_type == "flow_prediction"
    # a saved converted scheduler keeps `shift` (not the hidden `flow_shift`) on reload
    tuned.save_pretrained(tmp_path / "tuned")
    assert RestorationGuidedFlowScheduler.from_pretrained(tmp_path / "tuned").config.shift == 6.0


def test_from_sana_config_rejects_bad_input(tmp_path):
    epsilon = DPMSolverMultistepScheduler(prediction_type="epsilon").config
    with pytest.raises(ValueError, match="prediction_type"):
        RestorationGuidedFlowScheduler.from_sana_config(epsilon)
    no_flow = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=False).config
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        RestorationGuidedFlowScheduler.from_sana_config(no_flow)
    with pytest.raises(ValueError, match="not an existing local folder"):
        RestorationGuidedFlowScheduler.from_sana_config(tmp_path / "missing")
    with pytest.raises(ValueError, match="scheduler_config.json"):
        RestorationGuidedFlowScheduler.from_sana_config(tmp_path)
    with pytest.raises(ValueError, match="config_or_path"):
        RestorationGuidedFlowScheduler.from_sana_config(3)
    # a plain flow-matching config is fine
    fm = RestorationGuidedFlowScheduler.from_sana_config(FrozenDict(FlowMatchEulerDiscreteScheduler(shift=3.0).config))
    assert fm.config.shift == 3.0


# ------------------------------------------------------------------------------------------------ bad arguments


def test_bad_step_arguments_raise_clear_errors():
    scheduler = RestorationGuidedFlowScheduler(shift=3.0)
    scheduler.set_timesteps(3)
    x, v = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="integer index"):
        scheduler.step(v, 1, x)
    with pytest.raises(ValueError, match="integer index"):
        scheduler.step(v, torch.tensor(999), x)
    with pytest.raises(ValueError, match="per_token_timesteps"):
        scheduler.step(v, t, x, per_token_timesteps=torch.ones(2, 64))
    with pytest.raises(ValueError, match=r"condition_latents.*\(2, 4, 4, 4\).*\(2, 4, 8, 8\)"):
        scheduler.step(v, t, x, condition_latents=_randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="condition_latents"):
        scheduler.step(v, t, x, condition_latents=_randn(3, 4, 8, 8))
    with pytest.raises(ValueError, match="condition_latents"):
        scheduler.step(v, t, x, restoration_guidance_tau=4.0)
    with pytest.raises(ValueError, match="restoration_guidance_tau"):
        scheduler.step(v, t, x, condition_latents=x, restoration_guidance_tau=-1.0)
    assert scheduler.step_index is None  # rejected calls do not advance the schedule
    for t in scheduler.timesteps:
        x = scheduler.step(v, t, x).prev_sample
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(v, scheduler.timesteps[-1], x)


@pytest.mark.parametrize(
    "config, name",
    [
        (dict(restoration_guidance_tau=-1.0), "restoration_guidance_tau"),
        (dict(restoration_guidance_tau=float("inf")), "restoration_guidance_tau"),
        (dict(restoration_guidance_sigma_min=-0.1), "restoration_guidance_sigma_min"),
        (dict(restoration_guidance_sigma_type="karras"), "restoration_guidance_sigma_type"),
        (dict(time_shift_type="cubic"), "time_shift_type"),
    ],
)
def test_bad_config_raises(config, name):
    with pytest.raises(ValueError, match=name):
        RestorationGuidedFlowScheduler(**config)


def test_inverted_sigmas_are_rejected_by_restoration_features():
    scheduler = RestorationGuidedFlowScheduler(invert_sigmas=True, restoration_guidance_tau=4.0)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="invert_sigmas"):
        scheduler.restoration_guidance_strength(0.5)
