"""Sampler: the sigma schedule, Euler + CFG against diffusers' MochiPipeline, decoding, determinism,
no recompilation across prompts / seeds / LoRA values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dit_ref
from compiles import compiled_functions
import vae_ref
from mochi_jax.lib import sampling
from mochi_jax.checkpoints import convert_dit
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.sharding import make_mesh
from mochi_jax.checkpoints import load_dit


@pytest.mark.parametrize("steps,threshold", [(64, 0.025), (7, 0.025), (10, 0.1), (2, 0.025)])
def test_sigma_schedule_matches_reference(steps, threshold):
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    ours = sampling.sigma_schedule(steps, threshold)
    ref = np.append(np.asarray(linear_quadratic_schedule(steps, threshold), np.float64), 0.0)
    assert ours.shape == (steps + 1,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and np.all(np.diff(ours) < 0)
    if steps == 64:
        assert abs(ours[-2] - 0.0594) < 1e-3  # the large last step the spec warns about


def _pipeline(transformer, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    sched = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    return MochiPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny random (DiT, VAE) pairs as references, our converted copies."""
    out = {}
    vcfg = vae_ref.our_config("c32")
    vref = vae_ref.make_reference(vcfg, seed=3)
    vparams = vae_ref.params_from_state_dict(vcfg, vae_ref.state_dict_np(vref))
    for name in ("h2d16", "h3d8"):
        cfg = dit_ref.our_config(name)
        ref = dit_ref.make_reference(cfg, seed=1)
        d = tmp_path_factory.mktemp(name)
        _, genmo = dit_ref.write_both_layouts(ref, d)
        convert_dit(genmo, d / "ours", dtype="float32", progress=False)
        cfg, params = load_dit(d / "ours", compute_dtype="float32", remat="none")
        out[name] = (cfg, params, ref)
    return out, (vcfg, vparams, vref)


def _embeds(cfg, batch, seed):
    rng = np.random.default_rng(seed)
    L = 8
    feats = rng.standard_normal((2, batch, L, cfg.t5_dim)).astype(np.float32)
    mask = np.zeros((2, batch, L), bool)
    for i in range(batch):
        mask[0, i, :1] = True  # negative prompt: "" is EOS only
        mask[1, i, :3 + 2 * i] = True
    return (feats[1], mask[1]), (feats[0], mask[0])


@pytest.mark.parametrize("name,steps,guidance,frames,size", [
    ("h2d16", 6, 4.5, 7, (32, 48)),
    ("h3d8", 5, 6.0, 13, (48, 32)),
])
def test_sampler_matches_diffusers_pipeline(models, name, steps, guidance, frames, size):
    dits, (vcfg, vparams, vref) = models
    cfg, params, ref = dits[name]
    h, w = size
    cond, uncond = _embeds(cfg, batch=2, seed=steps)
    noise = sampling.initial_noise([5, 6], sampling.latent_shape(frames, h, w))

    ours = sampling.denoise(cfg, params, noise, cond, uncond, sampling.sigma_schedule(steps), guidance)
    pipe = _pipeline(ref, vref)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=torch.from_numpy(cond[0]), prompt_attention_mask=torch.from_numpy(cond[1]),
                      negative_prompt_embeds=torch.from_numpy(uncond[0]),
                      negative_prompt_attention_mask=torch.from_numpy(uncond[1]),
                      height=h, width=w, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                      latents=torch.from_numpy(np.asarray(noise)), output_type="latent").frames
    err = dit_ref.rel_l2(ours, theirs.numpy())
    print(f"{name}: latents rel L2 {err:.2e}")
    assert err <= 1e-4, err
    assert dit_ref.rel_l2(ours, noise) > 0.1  # the sampler moved the latents

    # Decoding: our frames vs the reference VAE on the reference's latents, with the pipeline's
    # de-normalisation (latents * std + mean).
    frames_ours = sampling.decode_frames(vcfg, vparams, ours, tiled=False)
    assert frames_ours.shape == (2, frames, h, w, 3) and frames_ours.dtype == np.uint8
    with torch.no_grad():
        mean = torch.tensor(vref.config.latents_mean).view(1, 12, 1, 1, 1)
        std = torch.tensor(vref.config.latents_std).view(1, 12, 1, 1, 1)
        pix = vref.decode(theirs * std + mean, return_dict=False)[0]
    ref_frames = np.clip(np.round((pix.numpy().transpose(0, 2, 3, 4, 1) + 1.0) * 127.5), 0, 255)
    diff = np.abs(frames_ours.astype(np.int32) - ref_frames.astype(np.int32))
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (diff.max(), np.mean(diff > 0))


def test_no_guidance_runs_the_conditional_branch_alone(models):
    dits, _ = models
    cfg, params, ref = dits["h2d16"]
    cond, uncond = _embeds(cfg, batch=1, seed=0)
    noise = sampling.initial_noise([1], sampling.latent_shape(7, 32, 32))
    sig = sampling.sigma_schedule(3)
    a = sampling.denoise(cfg, params, noise, cond, uncond, sig, guidance=1.0)
    b = sampling.denoise(cfg, params, noise, cond, None, sig, guidance=6.0)
    np.testing.assert_array_equal(a, b)
    # by hand: three Euler steps of the reference transformer
    z = np.asarray(noise)
    for s, s_next in zip(sig[:-1], sig[1:]):
        t = np.full((1,), 1000.0 * (1.0 - s), np.float32)
        v = dit_ref.reference_forward(ref, z, cond[0], cond[1], t)
        z = z + (s - s_next) * v
    assert dit_ref.rel_l2(a, z) < 1e-5


def test_noise_is_per_seed_and_sampling_is_deterministic(models):
    dits, _ = models
    cfg, params, _ = dits["h2d16"]
    shape = sampling.latent_shape(7, 32, 32)
    batch = sampling.initial_noise([11, 12], shape)
    np.testing.assert_array_equal(batch[1], sampling.initial_noise([12], shape)[0])
    cond, uncond = _embeds(cfg, batch=2, seed=1)
    sig = sampling.sigma_schedule(3)
    a = sampling.denoise(cfg, params, batch, cond, uncond, sig, 4.5)
    b = sampling.denoise(cfg, params, batch, cond, uncond, sig, 4.5)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_lora_values_prompts_and_schedules_do_not_recompile(models):
    dits, _ = models
    cfg, params, _ = dits["h3d8"]
    targets = lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS)
    shape = sampling.latent_shape(7, 32, 32)
    noise = sampling.initial_noise([0], shape)
    cond, uncond = _embeds(cfg, batch=1, seed=2)
    from mochi_jax.models.dit import MochiDiT

    factors = MochiDiT(cfg, targets).init(jax.random.PRNGKey(0), noise, cond[0], cond[1], jnp.zeros((1,)))["lora"]
    bumped = jax.tree_util.tree_map(lambda x: x + 0.05, factors)
    base = sampling.denoise(cfg, params, noise, cond, uncond, sampling.sigma_schedule(2), 4.5)
    zero_b = sampling.denoise(cfg, params, noise, cond, uncond, sampling.sigma_schedule(2), 4.5,
                              lora=(factors, targets))
    np.testing.assert_allclose(zero_b, base, atol=1e-6)  # b = 0 adds nothing
    other_cond = (cond[0] + 1, cond[1])
    with compiled_functions() as compiled:
        other = sampling.denoise(cfg, params, noise, other_cond, uncond, sampling.sigma_schedule(3), 6.0,
                                 lora=(bumped, targets))
    assert "jitted_step" not in compiled, compiled
    assert dit_ref.rel_l2(other, zero_b) > 1e-3


def test_one_step_schedule_is_refused():
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        sampling.sigma_schedule(1)


@pytest.mark.parametrize("frames,h,w,msg", [(8, 32, 32, r"6k\+1"), (7, 40, 32, "multiples of 16")])
def test_bad_video_sizes_are_refused(frames, h, w, msg):
    with pytest.raises(ValueError, match=msg):
        sampling.latent_shape(frames, h, w)


def test_the_fit_check_lowers_what_denoise_runs(models, monkeypatch):
    """sampler_program (what the fit check compiles) and denoise's real call of the step lower to the
    same HLO text, with and without guidance, on a one-device mesh as the sample command runs it."""
    cfg, params, _ = models[0]["h2d16"]
    place = sampling.placement(cfg, (), make_mesh({}, jax.devices()[:1]))
    params = jax.device_put(params, place.params)
    shape = sampling.latent_shape(7, 32, 48)
    for guidance in (1.0, 4.5):
        cond, uncond = _embeds(cfg, 2, seed=0)
        calls = []
        real_step = sampling.jitted_step

        def record(*args, **kwargs):  # lowered where denoise calls it: inside its mesh and rules
            calls.append(real_step.lower(*args, **kwargs).as_text())
            return real_step(*args, **kwargs)

        monkeypatch.setattr(sampling, "jitted_step", record)
        sampling.denoise(cfg, params, sampling.initial_noise([0, 1], shape), cond, uncond,
                         sampling.sigma_schedule(2), guidance)
        monkeypatch.setattr(sampling, "jitted_step", real_step)
        real = calls[0]
        program = sampling.sampler_program(cfg, (), 2, shape, 8, guidance > 1.0, place)
        assert program.lower().as_text() == real, guidance


def _mesh(**sizes):
    """What sampler_rules and idle_note read of a mesh: its axis sizes and its devices."""
    import types

    shape = {a: sizes.get(a, 1) for a in ("data", "fsdp", "sequence", "tensor")}
    return types.SimpleNamespace(shape=shape, devices=np.zeros([shape[a] for a in shape]))


@pytest.mark.parametrize("sizes,rows,batch,seq,idle", [
    (dict(fsdp=16), 2, (), ("sequence",), "--config.mesh.data=2 --config.mesh.fsdp=8 splits both"),
    (dict(data=2, fsdp=8), 2, ("data",), ("sequence", "fsdp"), ""),
    (dict(data=8), 4, (), ("sequence", "data"), ""),  # 4 rows: data 8 splits the tokens (24 heads)
    (dict(data=2, fsdp=4), 8, ("data", "fsdp"), ("sequence",), ""),
    (dict(fsdp=2, sequence=4), 2, ("fsdp",), ("sequence",), ""),
    (dict(data=16), 2, (), ("sequence",), "--config.mesh.data=2 --config.mesh.fsdp=8 splits both"),
])
def test_sampler_rules_put_data_and_fsdp_where_they_help(sizes, rows, batch, seq, idle):
    """The batch over data / fsdp where they divide it, else the tokens when the 24 heads allow it, else
    copies, with a note naming a mesh of the same devices that splits both."""
    mesh = _mesh(**sizes)
    rules = dict(sampling.sampler_rules(mesh, rows, 24))
    assert rules["batch"] == batch and rules["seq"] == seq
    assert rules["act_heads"] == (*seq, "tensor")
    note = sampling.idle_note(mesh, rows, 24)
    assert (idle in note) if idle else note == "", note
