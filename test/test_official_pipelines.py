"""Each of our pipelines against ltx-pipelines 1.0.0's own pipeline code: tiny official-layout files
(test/official.py writes them), fp32 on CPU, the same encoded prompt and seed; the final video and
audio latents agree within 1e-5 relative max error (reference.TOL), and so do the decoded frames.

ltx-pipelines' entry points run unmodified except for what test/official.py lists (dtype, tiny
latent sizes, Gemma's output, torchaudio's mel spectrogram); the latents are read where they enter
the VAE decoders.

With LTX2_TP_PARITY_OUT=FILE each comparison also appends its measured errors to FILE (a JSON list:
pipeline, video / audio relative max error, bit-equal or not, how ltx-pipelines was driven):

    LTX2_TP_PARITY_OUT=parity.json python -m pytest -q -s test/test_official_pipelines.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import official  # noqa: E402
from reference import TOL, rel_err  # noqa: E402

from ltx2_tp.pipelines.checkpoints import build_components  # noqa: E402
from ltx2_tp.pipelines.registry import get_pipeline_class  # noqa: E402
from ltx2_tp.pipelines.request import GenerationRequest  # noqa: E402

PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
SIZE = dict(width=64, height=64, num_frames=9, fps=24.0)  # stage 1: 32x32, one latent pixel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and with other processes on the 2 cores far faster (a 32x32
    linear: 29 us on 1 thread, 3.8 ms on 2 under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return official.write_files(tmp_path_factory.mktemp("ltx2_official"))


@pytest.fixture(scope="module")
def ours(files):
    return build_components(files.checkpoint, spatial_upsampler_path=files.spatial_upsampler, text_encoder_path="tiny",
                            distilled_lora_path=files.distilled_lora)


@pytest.fixture(scope="module")
def contexts(ours):
    from ltx2_tp.pipelines.stages import encode_prompt

    return {p: encode_prompt(ours, p) for p in (PROMPT, NEGATIVE)}


def lora(path, strength=1.0):
    from ltx_core.loader import LTXV_LORA_COMFY_RENAMING_MAP, LoraPathStrengthAndSDOps

    return LoraPathStrengthAndSDOps(path, strength, LTXV_LORA_COMFY_RENAMING_MAP)


def guiders(stg_block=1):
    """ltx-pipelines' LTX-2 defaults with STG on the tiny model's last block (29 does not exist here)."""
    from dataclasses import replace

    from ltx_pipelines.utils.constants import LTX_2_PARAMS

    return (replace(LTX_2_PARAMS.video_guider_params, stg_blocks=[stg_block]),
            replace(LTX_2_PARAMS.audio_guider_params, stg_blocks=[stg_block]))


def ours_latents(pipeline, req):
    """Our pipeline's final latents (the ones its __call__ decodes)."""
    import types

    from ltx2_tp.pipelines import stages
    from ltx2_tp.pipelines.base import Run

    pipeline.check(req)
    gen = torch.Generator().manual_seed(req.seed)
    c = pipeline.c
    pos = stages.encode_prompt(c, req.prompt)
    neg = stages.encode_prompt(c, req.negative_prompt) if pipeline.guided else None
    run = Run(req, gen, pos, neg, stages.StageTimer(), None)
    video, audio = pipeline.latents(run)
    return types.SimpleNamespace(video=video, audio=audio, run=run)


def assert_close(name, got, want, exact=False):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = rel_err(got, want)
    if exact:
        assert torch.equal(got, want), (name, err)
    assert err <= TOL, (name, err)
    return err


# ---- inputs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two images, a reference video and a source video with 16 kHz audio (the tiny audio VAE's rate:
    no resampling, which would need torchaudio), an audio file."""
    import numpy as np
    from ltx_core.types import Audio
    from ltx_pipelines.utils.media_io import encode_video
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    out = {}
    for name in ("first", "last"):
        out[name] = str(d / f"{name}.png")
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(out[name])
    t = torch.arange(16000 * 9 // 24) / 16000
    wave = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 660 * t)]) * 0.5
    for name, size in (("reference", 64), ("source", 64)):
        frames = torch.from_numpy((rng.random((9, size, size, 3)) * 255).astype(np.uint8))
        out[name] = str(d / f"{name}.mp4")
        encode_video(iter([frames]), 24, Audio(waveform=wave, sampling_rate=16000), out[name], 1)
    out["audio"] = out["source"]
    return out


def run_official(module, contexts, make, call):
    rec = official.Recorder()
    with official.official_fp32(module, contexts, rec):
        rec.output = official.drain(call(make()))
    return rec


ENTRY_POINT = "entry point: {}.__call__ (test/official.py's patches)"
DRIVEN = {  # how each test runs ltx-pipelines (the reference of its comparison)
    "LTX2TwoStagePipeline": ENTRY_POINT.format("ti2vid_two_stages.TI2VidTwoStagesPipeline"),
    "LTX2LongVideo": ENTRY_POINT.format("ti2vid_two_stages.TI2VidTwoStagesPipeline") + "; ours with 4-token chunks",
    "LTX2Pipeline": ENTRY_POINT.format("ti2vid_one_stage.TI2VidOneStagePipeline"),
    "LTX2DistilledPipeline": ENTRY_POINT.format("distilled.DistilledPipeline"),
    "LTX2TwoStageHQPipeline": ENTRY_POINT.format("ti2vid_two_stages_hq.TI2VidTwoStagesHQPipeline"),
    "LTX2KeyframeInterpolationPipeline": ENTRY_POINT.format("keyframe_interpolation.KeyframeInterpolationPipeline"),
    "LTX2RetakePipeline": ENTRY_POINT.format("retake.RetakePipeline"),
    "LTX2ICLoraPipeline": ENTRY_POINT.format("ic_lora.ICLoraPipeline"),
    "LTX2A2VidPipeline": ENTRY_POINT.format("a2vid_two_stage.A2VidPipelineTwoStage"),
    "guidance (batched passes)": "denoising function: utils.helpers.multi_modal_guider_factory_denoising_func over "
                                 "ltx-core's DiT (ModelLedger), 4 Euler steps",
}


def record(name, video, audio, bit_equal, note=""):
    """Append one comparison's measured errors to $LTX2_TP_PARITY_OUT (a JSON list) when it is set."""
    out = os.environ.get("LTX2_TP_PARITY_OUT")
    if not out:
        return
    path = Path(out)
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append({"pipeline": name, "video_rel_max_err": video, "audio_rel_max_err": audio, "bit_equal": bit_equal,
                 "driven": DRIVEN.get(name, ""), "note": note})
    path.write_text(json.dumps(rows, indent=1))


def check(name, got, rec, audio=True, note=""):
    errs = [assert_close(f"{name} video", got.video, rec.video)]
    same = [torch.equal(got.video, rec.video)]
    if audio:
        errs.append(assert_close(f"{name} audio", got.audio, rec.audio))
        same.append(torch.equal(got.audio, rec.audio))
    print(name, *(f"{e:.2e}" for e in errs))
    record(name, errs[0], errs[1] if audio else None, all(same), note)


CPU = torch.device("cpu")
H, W, F, FPS = SIZE["height"], SIZE["width"], SIZE["num_frames"], SIZE["fps"]


def request(steps=2, **kw):
    return GenerationRequest(PROMPT, NEGATIVE, seed=7, num_inference_steps=steps,
                             **{"video_stg_blocks": [1], "audio_stg_blocks": [1], **SIZE, **kw})


# ---- one test per pipeline ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_two_stage(files, contexts):
    import ltx_pipelines.ti2vid_two_stages as mod

    return run_official(mod, contexts, lambda: mod.TI2VidTwoStagesPipeline(
        files.checkpoint, [lora(files.distilled_lora)], files.spatial_upsampler, None, [], device=CPU),
        lambda p: p(PROMPT, NEGATIVE, 7, H, W, F, FPS, 2, *guiders(), []))


def test_two_stage(ours, official_two_stage):
    check("LTX2TwoStagePipeline", ours_latents(get_pipeline_class("LTX2TwoStagePipeline")(ours), request()),
          official_two_stage)


def test_long_video_on_two_stage(ours, official_two_stage, monkeypatch):
    """LTX2LongVideo is the two-stage flow with its chunk plan (here chunks of 4 tokens, which the
    memory rule would only pick for long videos)."""
    from ltx2_tp.memory.plan import ExecutionPlan

    class FourTokenChunks:  # a PlanRule that always chunks
        def for_step(self, *args, **kwargs):  # PlanRule's entry point since the activation budget (was plan)
            return ExecutionPlan(4, 4, cache_rope=False)

    rule = ours.transformer.plan_rule
    pipe = get_pipeline_class("LTX2LongVideo")(ours)
    ours.transformer.plan_rule = FourTokenChunks()
    try:
        check("LTX2LongVideo", ours_latents(pipe, request()), official_two_stage)
    finally:
        ours.transformer.plan_rule = rule


def test_one_stage(files, ours, contexts, media):
    import ltx_pipelines.ti2vid_one_stage as mod
    from ltx_pipelines.utils.args import ImageConditioningInput

    rec = run_official(mod, contexts, lambda: mod.TI2VidOneStagePipeline(files.checkpoint, None, [], device=CPU),
                       lambda p: p(PROMPT, NEGATIVE, 7, H, W, F, FPS, 2, *guiders(),
                                   [ImageConditioningInput(media["first"], 0, 1.0)]))
    req = request(image_path=media["first"])
    check("LTX2Pipeline", ours_latents(get_pipeline_class("LTX2Pipeline")(ours), req), rec)


def test_distilled(files, ours, contexts):
    import ltx_pipelines.distilled as mod

    rec = run_official(mod, contexts, lambda: mod.DistilledPipeline(files.checkpoint, None, files.spatial_upsampler, [],
                                                                    device=CPU),
                       lambda p: p(PROMPT, 7, H, W, F, FPS, []))
    check("LTX2DistilledPipeline", ours_latents(get_pipeline_class("LTX2DistilledPipeline")(ours), request()), rec)


def test_two_stage_hq(files, ours, contexts):
    import ltx_pipelines.ti2vid_two_stages_hq as mod
    from ltx_pipelines.utils.constants import LTX_2_3_HQ_PARAMS as HQ

    rec = run_official(mod, contexts, lambda: mod.TI2VidTwoStagesHQPipeline(
        files.checkpoint, [lora(files.distilled_lora)], 0.25, 0.5, files.spatial_upsampler, None, (), device=CPU),
        lambda p: p(PROMPT, NEGATIVE, 7, H, W, F, FPS, 2, HQ.video_guider_params, HQ.audio_guider_params, []))
    req = GenerationRequest(PROMPT, NEGATIVE, seed=7, num_inference_steps=2, **SIZE)  # the HQ defaults
    check("LTX2TwoStageHQPipeline", ours_latents(get_pipeline_class("LTX2TwoStageHQPipeline")(ours), req), rec)


def test_keyframe_interpolation(files, ours, contexts, media):
    import ltx_pipelines.keyframe_interpolation as mod
    from ltx_pipelines.utils.args import ImageConditioningInput as Image

    images = [Image(media["first"], 0, 1.0), Image(media["last"], 8, 0.9)]
    rec = run_official(mod, contexts, lambda: mod.KeyframeInterpolationPipeline(
        files.checkpoint, [lora(files.distilled_lora)], files.spatial_upsampler, None, [], device=CPU),
        lambda p: p(PROMPT, NEGATIVE, 7, H, W, F, FPS, 2, *guiders(), images))
    req = request(images=[(media["first"], 0, 1.0), (media["last"], 8, 0.9)])
    check("LTX2KeyframeInterpolationPipeline",
          ours_latents(get_pipeline_class("LTX2KeyframeInterpolationPipeline")(ours), req), rec)


def test_retake(files, ours, contexts, media):
    import ltx_pipelines.retake as mod

    rec = run_official(mod, contexts, lambda: mod.RetakePipeline(files.checkpoint, None, [], device=CPU),
                       lambda p: p(media["source"], PROMPT, 0.1, 0.3, 7, negative_prompt=NEGATIVE, num_inference_steps=2,
                                   video_guider_params=guiders()[0], audio_guider_params=guiders()[1]))
    req = request(video_path=media["source"], start_time=0.1, end_time=0.3)
    with official.mel_spectrogram_stand_in():
        got = ours_latents(get_pipeline_class("LTX2RetakePipeline")(ours), req)
    assert (req.width, req.height, req.num_frames) == (64, 64, 9)  # the source's
    check("LTX2RetakePipeline", got, rec)


def test_ic_lora(files, ours, contexts, media, tmp_path):
    """The test's LoRA file plays the IC-LoRA, with a reference_downscale_factor of 2 in its metadata;
    conditioning attention strength 0.5 puts an attention mask on the reference tokens."""
    import ltx_pipelines.ic_lora as mod
    from safetensors.torch import load_file, save_file

    ic = str(tmp_path / "ic-lora.safetensors")
    save_file(load_file(files.distilled_lora), ic, metadata={"reference_downscale_factor": "2"})
    rec = run_official(mod, contexts, lambda: mod.ICLoraPipeline(files.checkpoint, files.spatial_upsampler, None,
                                                                 [lora(ic, 0.8)], device=CPU),
                       lambda p: p(PROMPT, 7, H, W, F, FPS, [], [(media["reference"], 1.0)],
                                   conditioning_attention_strength=0.5))
    req = request(video_conditioning=[(media["reference"], 1.0)], conditioning_attention_strength=0.5)
    pipe = get_pipeline_class("LTX2ICLoraPipeline")(ours, lora_path=ic, lora_strength=0.8)
    assert pipe.reference_downscale_factor == 2
    check("LTX2ICLoraPipeline", ours_latents(pipe, req), rec)


def test_a2vid(files, ours, contexts, media):
    """The audio is input: the video latents are compared, and the written audio is the input's."""
    import ltx_pipelines.a2vid_two_stage as mod

    rec = run_official(mod, contexts, lambda: mod.A2VidPipelineTwoStage(
        files.checkpoint, [lora(files.distilled_lora)], files.spatial_upsampler, None, [], device=CPU),
        lambda p: p(PROMPT, NEGATIVE, 7, H, W, F, FPS, 2, guiders()[0], [], media["audio"],
                    audio_max_duration=F / FPS))
    pipe = get_pipeline_class("LTX2A2VidPipeline")(ours)
    with official.mel_spectrogram_stand_in():
        got = ours_latents(pipe, request(audio_path=media["audio"]))
    check("LTX2A2VidPipeline", got, rec, audio=False, note="audio: the input, written as given; the waveform is "
          "bit-equal to ltx-pipelines' (asserted)")
    audio = pipe.source_audio(got.run)
    assert torch.equal(audio.waveform, rec.output[1].waveform) and audio.sampling_rate == rec.output[1].sampling_rate


# ---- the guidance itself -------------------------------------------------------------------------

def test_guidance_batched_equals_sequential_and_ltx_pipelines(files, ours, contexts):
    """Sigma-binned params (a MultiModalGuiderFactory), every term on, the audio skipping every other
    step: our passes as one batched forward, one forward each, and ltx-pipelines'
    multi_modal_guider_factory_denoising_func over ltx-core's DiT give the same 4 Euler steps."""
    from ltx_core.components.guiders import MultiModalGuiderFactory
    from ltx_core.components.guiders import MultiModalGuiderParams as P
    from ltx_core.components.guiders import create_multimodal_guider_factory
    from ltx_core.types import VideoPixelShape
    from ltx_pipelines.utils.helpers import multi_modal_guider_factory_denoising_func
    from ltx_pipelines.utils.model_ledger import ModelLedger

    from ltx2_tp.pipelines import stages
    from ltx2_tp.pipelines.guidance import guided_denoise_fn

    video = MultiModalGuiderFactory.from_dict({1.0: P(3.0, 1.0, [1], 0.7, 3.0), 0.6: P(cfg_scale=2.0, rescale_scale=0.5)})
    audio = MultiModalGuiderFactory.from_dict({1.0: P(7.0, 1.0, [0], 0.7, 3.0, skip_step=1), 0.6: P()})
    pos, neg = contexts[PROMPT], contexts[NEGATIVE]
    start = stages.prepare_latents(ours, VideoPixelShape(batch=1, frames=9, width=64, height=64, fps=24.0),
                                   torch.Generator().manual_seed(3))
    sigmas = stages.stage1_sigmas(4, CPU)
    sizes: list[int] = []
    hook = ours.transformer.register_forward_hook(lambda m, i, o: sizes.append(o[0].shape[0]))
    results = {}
    try:
        for batch in (True, False):
            sizes.clear()
            fn = guided_denoise_fn(ours, pos, neg, video, audio, batch=batch)
            results[batch] = (stages.denoise(ours, start, sigmas, fn, "stage1"), list(sizes))
    finally:
        hook.remove()
    ref_model = ModelLedger(dtype=torch.float32, device=CPU, checkpoint_path=files.checkpoint).transformer()
    official_fn = multi_modal_guider_factory_denoising_func(
        create_multimodal_guider_factory(video, negative_context=neg[0]),
        create_multimodal_guider_factory(audio, negative_context=neg[1]), pos[0], pos[1], ref_model)
    with torch.no_grad():
        ref = stages.denoise(ours, start, sigmas, official_fn, "stage1")
    (batched, batched_sizes), (sequential, sequential_sizes) = results[True], results[False]
    assert set(sequential_sizes) == {1} and sum(batched_sizes) == len(sequential_sizes)
    assert batched_sizes[0] == 4 and len(batched_sizes) < len(sequential_sizes), batched_sizes
    errs = {}
    for name in ("video", "audio"):
        b, s, r = (getattr(x, name).latent for x in (batched, sequential, ref))
        assert_close(f"batched {name}", b, s)
        errs[name] = (assert_close(f"ltx-pipelines {name}", s, r), torch.equal(s, r))
    record("guidance (batched passes)", errs["video"][0], errs["audio"][0], errs["video"][1] and errs["audio"][1],
           "sigma-binned MultiModalGuiderFactory, every term on; ours sequential vs theirs (batched = sequential "
           "asserted apart)")


def test_comparison_sees_a_guidance_term(ours, official_two_stage):
    """The parity above is not vacuous: STG on the other block moves the latents 100x beyond 1e-5."""
    got = ours_latents(get_pipeline_class("LTX2TwoStagePipeline")(ours), request(video_stg_blocks=[0]))
    assert rel_err(got.video, official_two_stage.video) > 100 * TOL  # measured 1.4e-3


def test_guidance_defaults_and_errors(ours):
    from ltx_pipelines.utils.constants import LTX_2_3_PARAMS, LTX_2_PARAMS

    from ltx2_tp.pipelines.guidance import default_params
    from ltx2_tp.pipelines.request import RequestError

    # the file says model_version 2.0.0-tiny: LTX-2's params, STG moved into the 2 blocks
    params = default_params(ours.transformer.cfg, ours.checkpoint_path)
    assert params.num_inference_steps == LTX_2_PARAMS.num_inference_steps == 40
    assert params.video_guider_params.stg_blocks == [1] and params.audio_guider_params.cfg_scale == 7.0
    assert LTX_2_3_PARAMS.num_inference_steps == 30 and LTX_2_3_PARAMS.video_guider_params.stg_blocks == [28]
    pipe = get_pipeline_class("LTX2TwoStagePipeline")(ours)
    video, audio = pipe.guidance(request(a2v_guidance_scale=1.0, audio_rescale_scale=0.0))
    assert (video.modality_scale, audio.rescale_scale, audio.modality_scale) == (1.0, 0.0, 3.0)
    for kw, field in ((dict(video_stg_blocks=[2]), "video_stg_blocks"), (dict(video_rescale_scale=2.0), "video_rescale_scale"),
                      (dict(audio_skip_step=-1), "audio_skip_step"), (dict(images=[("x.png", 9, 1.0)]), "images")):
        with pytest.raises(RequestError) as e:
            pipe.check(request(**kw))
        assert e.value.field == field, (kw, e.value)


def test_cli_reaches_the_family(tmp_path, media, capsys):
    """`ltx2-tp generate --pipeline-class-name ...` runs a pipeline of the family with its input flags;
    bad guidance / input flags stop before anything is built, naming the flag (in-process: the CLI's
    main, without a new interpreter's imports)."""
    from ltx2_tp.cli import main

    base = ["generate", "--prompt", "a fox", "--width", "64", "--height", "64", "--num-frames", "9"]
    out = tmp_path / "kf.mp4"
    assert main([*base, "--pipeline-class-name", "LTX2KeyframeInterpolationPipeline", "--num-inference-steps", "2",
                 "--image", media["first"], "0", "1.0", "--image", media["last"], "8", "0.9",
                 "--output-path", str(out)]) == 0
    assert out.is_file()
    for flags, msg in ((["--video-stg-blocks", "5"], "--video-stg-blocks: block indices must be between 0 and 1"),
                       (["--image", media["first"], "9", "1.0"], "--image: image 0: frame index must be between 0 and 8"),
                       (["--pipeline-class-name", "LTX2RetakePipeline"], "--video-path: the retake pipeline needs"),
                       (["--pipeline-class-name", "Nope"], "--pipeline-class-name: unknown pipeline 'Nope'")):
        capsys.readouterr()
        assert main([*base, *flags, "--output-path", str(tmp_path / "no.mp4")]) == 2, flags
        assert msg in capsys.readouterr().err and not (tmp_path / "no.mp4").exists(), flags
