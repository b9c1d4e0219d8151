"""The opt-in approximations in the pipelines: keyframe-stride diffusion and step caching (their
mechanics, and where they are exact), the request fields / flags that ask for them (and
refuse what a pipeline cannot do), and under TP / Ulysses (gloo): the temporal window equal to
the single process, every rank taking the same step-cache decision. The temporal window's own
mechanics: test_windowed_attention.py. Their deviation over a whole
run: benchmark/quality.py (README "Approximations").
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from dist_utils import run_distributed
from reference import TOL, rel_err

from ltx2_tp.pipelines import keyframe_stride, stages, step_cache
from ltx2_tp.pipelines.registry import get_pipeline_class
from ltx2_tp.pipelines.request import GenerationRequest, RequestError
from ltx2_tp.pipelines.tiny import build_tiny_components


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(0)


def _run(comps, pipeline="LTX2TwoStagePipeline", **kw):
    kw = {"width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 4, "seed": 3, **kw}
    run, video, audio = get_pipeline_class(pipeline)(comps).run_latents(GenerationRequest(prompt="a fox", **kw))
    return run.approximations, video, audio


@pytest.fixture(scope="module")
def exact(comps):
    """The exact run the approximations that keep everything are compared with."""
    return _run(comps)[1:]


# ---- keyframe stride --------------------------------------------------------------------------------

def test_keyframe_indices():
    assert keyframe_stride.keyframe_indices(7, 2) == [0, 2, 4, 6]
    assert keyframe_stride.keyframe_indices(8, 3) == [0, 3, 6, 7]  # and the last
    assert keyframe_stride.keyframe_indices(2, 5) == [0, 1]


def test_stride_keeping_every_frame_equals_the_exact_pipeline(comps, exact):
    """9 frames are 2 latent frames: stride 4 keeps both, through the whole selection and fill."""
    report, v, a = _run(comps, keyframe_stride=4)
    assert report["keyframe_stride"]["stage1"] == {"frames": 2, "denoised_frames": 2}
    assert torch.equal(v, exact[0]) and torch.equal(a, exact[1])


def test_stride_denoises_keyframes_at_their_positions_and_interpolates_the_rest(comps):
    """A stand-in loop that writes each token's time into its latent: the loop sees the keyframes'
    tokens only, with their own positions; frames between are the linear blend of their neighbours,
    except tokens held by a zero denoise mask (a conditioned token keeps its clean latent)."""
    shape = stages.VideoPixelShape(batch=1, frames=33, width=64, height=64, fps=24.0)  # 5 latent frames, 2x2
    s = stages.prepare_latents(comps, shape, torch.Generator().manual_seed(0))
    hw = 4
    held = 3 * hw + 1  # a token of frame 3, which stride 2 interpolates
    video = replace(s.video, denoise_mask=s.video.denoise_mask.clone(), clean_latent=torch.full_like(s.video.latent, 7.0))
    video.denoise_mask[:, held] = 0.0
    s = stages.Streams(video, s.audio, s.video_tools, s.audio_tools)
    seen = {}

    def loop(c, sub, sigmas, fn, stage, progress):
        seen["positions"] = sub.video.positions
        time = sub.video.positions[:, 0, :, 0:1].float()
        return stages.Streams(replace(sub.video, latent=time.expand_as(sub.video.latent).clone()), sub.audio,
                              sub.video_tools, sub.audio_tools)

    report = {}
    out = keyframe_stride.strided(loop, 2, report)(comps, s, None, None, "stage1")
    keys = [0, 2, 4]
    idx = torch.cat([torch.arange(f * hw, (f + 1) * hw) for f in keys])
    assert torch.equal(seen["positions"], s.video.positions[:, :, idx])
    assert report == {"keyframe_stride": {"stage1": {"frames": 5, "denoised_frames": 3}}}
    lat = out.video.latent[0, :, 0].reshape(5, hw)
    t = s.video.positions[0, 0, :, 0].float().reshape(5, hw)
    for f in keys:
        assert torch.equal(lat[f], t[f])
    for f, (a, b) in ((1, (0, 2)), (3, (2, 4))):
        expect = 0.5 * t[a] + 0.5 * t[b]
        if f == 3:
            expect[1] = 7.0  # the held token
        assert torch.allclose(lat[f], expect, rtol=0, atol=1e-6)
    assert keyframe_stride.strided(loop, 1) is loop


def test_stride_runs_stage1_on_keyframe_tokens_only(comps):
    tokens = []
    hook = comps.transformer.register_forward_pre_hook(lambda m, args: tokens.append(args[0].latent.shape[1]))
    try:
        report, v, _ = _run(comps, num_frames=25, keyframe_stride=2, num_inference_steps=1)  # 4 latent frames
    finally:
        hook.remove()
    assert report["keyframe_stride"]["stage1"] == {"frames": 4, "denoised_frames": 3}  # 0, 2, 3
    hw1, hw2 = 1, 2 * 2  # stage 1 at 32x32, stage 2 at 64x64
    assert set(tokens) == {3 * hw1, 4 * hw2} and tokens[0] == 3 * hw1
    assert v.shape[2] == 4


# ---- step cache -------------------------------------------------------------------------------------

def test_step_cache_that_never_skips_equals_the_exact_pipeline(comps, exact):
    report, v, a = _run(comps, step_cache_threshold=1e-12)
    assert report["step_cache"]["stage1"]["skipped_steps"] == 0 and report["step_cache"]["stage1"]["steps"] == 4
    assert torch.equal(v, exact[0]) and torch.equal(a, exact[1])


def expected_skips(indicator: list, threshold: float) -> list[int]:
    """The rule, restated: steps from ceil(0.2 n) up to the last (excluded) may be skipped while the
    changes summed since the last step run stay below the threshold."""
    n, acc, out = len(indicator), 0.0, []
    for i, x in enumerate(indicator):
        if math.ceil(0.2 * n) <= i < n - 1 and acc + x < threshold:
            acc += x
            out.append(i)
        else:
            acc = 0.0
    return out


def test_step_cache_skips_the_expected_steps(comps):
    report, v, _ = _run(comps, num_inference_steps=6, step_cache_threshold=1.0)
    s1, s2 = report["step_cache"]["stage1"], report["step_cache"]["stage2"]
    assert s1["skipped_at"] == [2, 3, 4] and s2["skipped_at"] == [1]  # all but the first 20% and the last
    passes = s1["dit_passes"] // 3  # guided stage 1: the same passes every step
    assert s1["skipped_dit_passes"] == 3 * passes and s1["dit_passes"] == 3 * passes and passes >= 2
    assert s2["dit_passes"] == 2 and s2["skipped_dit_passes"] == 1
    changes = sorted(s1["indicator"][2:5])
    mid = (changes[0] + changes[1]) / 2 + 1e-9  # skips some of steps 2-4, not all
    report, _, _ = _run(comps, num_inference_steps=6, step_cache_threshold=mid)
    s1 = report["step_cache"]["stage1"]
    assert s1["skipped_at"] == expected_skips([math.inf] + s1["indicator"][1:], mid)
    assert 0 < len(s1["skipped_at"]) < 3


def test_skipped_step_reuses_the_previous_output(comps):
    shape = stages.VideoPixelShape(batch=1, frames=9, width=64, height=64, fps=24.0)
    s = stages.prepare_latents(comps, shape, torch.Generator().manual_seed(0))
    outputs = []

    def denoise_fn(video, audio, sigmas, i):
        outputs.append((video.latent * 0 + i, audio.latent * 0 + i))
        return outputs[-1]

    seen = []

    def progress(stage, done, total):
        seen.append(done)

    report = {}
    with step_cache.enabled(1.0, report):
        stages.denoise(comps, s, stages.stage1_sigmas(6, "cpu"), denoise_fn, "stage1", progress)
    assert [float(o[0].flatten()[0]) for o in outputs] == [0, 1, 5]  # steps 2-4 reused step 1's output
    assert report["stage1"]["skipped_at"] == [2, 3, 4] and seen == list(range(7))
    with step_cache.enabled(0.0, report):
        assert step_cache.for_stage(comps, denoise_fn, "stage1") is denoise_fn  # 0: off, the loop unchanged


def _parallel(rank, world, cfg, sd, v, a, window_ref):
    """Temporal window under Ulysses and TP against the single process; the step-cache change
    with a different latent on each rank: every rank acts on the largest."""
    from ltx2_tp.distributed.context import build_groups
    from ltx2_tp.memory.plan import ExecutionPlan
    from ltx2_tp.models.ltx2.weights import build_model

    alone = build_model(cfg, dtype=torch.float32, state_dict=sd)
    g = torch.Generator().manual_seed(rank)
    lat, alat = torch.randn(1, 12, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    prev = (lat, torch.full((1, 12, 1), 0.5), alat, torch.full((1, 5, 1), 0.5))
    cur = (lat * (1 + rank), torch.full((1, 12, 1), 0.45), alat, torch.full((1, 5, 1), 0.45))
    out = {}
    for tp, u in ((1, 2), (2, 1)):
        model = build_model(cfg, build_groups(tp, u, 1), dtype=torch.float32, state_dict=sd)
        for i, plan in enumerate((ExecutionPlan(attention_window_frames=1),
                                  ExecutionPlan(attn_chunk_tokens=4, ulysses_head_groups=2, attention_window_frames=1))):
            ov, oa = model(v, a, plan=plan)
            out[("window", tp, u, i)] = max(rel_err(ov, window_ref[0]), rel_err(oa, window_ref[1]))
        out[("change", tp, u)] = (step_cache.StepCache(model, 0.5, {}).change(prev, cur),
                                  step_cache.StepCache(alone, 0.5, {}).change(prev, cur))
    ring = build_model(cfg, build_groups(1, 1, 2), dtype=torch.float32, state_dict=sd)
    try:
        ring(v, a, plan=ExecutionPlan(attention_window_frames=1))
        out["ring"] = "ran"
    except NotImplementedError as e:
        out["ring"] = str(e)
    return out


def test_window_and_step_cache_under_ulysses_and_tp():
    from test_windowed_attention import window_model_case

    from ltx2_tp.memory.plan import ExecutionPlan
    from ltx2_tp.models.ltx2.weights import build_model, official_state_dict

    cfg, v, a = window_model_case()
    model = build_model(cfg, dtype=torch.float32, seed=3)
    ref = model(v, a, plan=ExecutionPlan(attention_window_frames=1))
    results = run_distributed(_parallel, 2, cfg, official_state_dict(model), v, a, ref)
    for out in results:
        assert "--ring-size" in out.pop("ring")
        assert all(e <= TOL for k, e in out.items() if k[0] == "window"), out
    for key in (k for k in results[0] if k[0] == "change"):
        got, alone = [r[key][0] for r in results], [r[key][1] for r in results]
        assert got[0] == got[1] == pytest.approx(max(alone), rel=1e-6) and alone[0] != alone[1]


# ---- asking for them --------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("attention_window_frames", 0, "between 1 and 250"), ("attention_window_frames", 2.5, "integer"),
    ("keyframe_stride", 17, "between 1 and 16"), ("step_cache_threshold", -0.1, "between 0 and 1"),
    ("step_cache_threshold", float("nan"), "between 0 and 1")])
def test_request_fields_name_themselves(field, value, message):
    with pytest.raises(RequestError, match=message) as e:
        GenerationRequest(prompt="x", **{field: value}).validate()
    assert e.value.field == field


def test_pipelines_refuse_what_they_cannot_do():
    one_stage, hq = get_pipeline_class("LTX2Pipeline"), get_pipeline_class("LTX2TwoStageHQPipeline")
    with pytest.raises(RequestError, match="stage 2") as e:
        one_stage.check_request(GenerationRequest(prompt="x", keyframe_stride=2), 2)
    assert e.value.field == "keyframe_stride"
    with pytest.raises(RequestError, match="res_2s") as e:
        hq.check_request(GenerationRequest(prompt="x", step_cache_threshold=0.1), 2)
    assert e.value.field == "step_cache_threshold"
    from ltx2_tp.pipelines.approximations import check_layout

    with pytest.raises(RequestError, match="ring attention"):
        check_layout(GenerationRequest(prompt="x", attention_window_frames=2), 2)
    for name in ("LTX2TwoStagePipeline", "LTX2LongVideo", "LTX2DistilledPipeline"):  # never by default
        assert get_pipeline_class(name).supports_keyframe_stride
        req = GenerationRequest(prompt="x")
        assert (req.attention_window_frames, req.keyframe_stride, req.step_cache_threshold) == (None, 1, 0.0)


def test_server_fields():
    from ltx2_tp.serving.errors import ApiError
    from ltx2_tp.serving.params import Limits, video_request

    req, _, _ = video_request({"prompt": "x", "keyframe_stride": "2", "step_cache_threshold": 0.05,
                               "attention_window_frames": 3}, Limits())
    assert (req.keyframe_stride, req.step_cache_threshold, req.attention_window_frames) == (2, 0.05, 3)
    with pytest.raises(ApiError) as e:
        video_request({"prompt": "x", "keyframe_stride": 0}, Limits())
    assert e.value.param == "keyframe_stride"


def test_cli_runs_and_reports_them(tmp_path, capsys):
    from ltx2_tp.cli import main

    out = tmp_path / "a.mp4"
    assert main(["generate", "--prompt", "a fox", "--width", "64", "--height", "64", "--num-frames", "17",
                 "--num-inference-steps", "4", "--attention-window-frames", "1", "--keyframe-stride", "2",
                 "--step-cache-threshold", "1", "--output-path", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.exists()
    assert "temporal-window attention, 1 latent frames" in text
    assert "keyframe stride, stage1 denoised 2 of 3 latent frames" in text
    assert "step cache, stage1 skipped 2 of 4 steps" in text
    assert main(["generate", "--prompt", "a fox", "--keyframe-stride", "2", "--pipeline-class-name", "LTX2Pipeline",
                 "--output-path", str(tmp_path / "b.mp4")]) == 2
    assert "--keyframe-stride: LTX2Pipeline does not support it" in capsys.readouterr().err
