"""benchmark/official_pipeline.py, which bench_request.py --official runs on the GPU: ltx-pipelines'
TI2VidTwoStagesPipeline over our in-memory components computes what our LTX2TwoStagePipeline does
(tiny, fp32: final video latents within 1e-5), on our DiT's own tensors (no copy)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from reference import TOL, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))

from official_pipeline import OfficialTwoStage  # noqa: E402

from ltx2_tp.pipelines import stages  # noqa: E402
from ltx2_tp.pipelines.base import Run  # noqa: E402
from ltx2_tp.pipelines.request import GenerationRequest  # noqa: E402
from ltx2_tp.pipelines.tiny import build_tiny_components  # noqa: E402
from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline  # noqa: E402


def test_official_two_stage_on_our_weights(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        comps = build_tiny_components(0)
        ours = LTX2TwoStagePipeline(comps)
        req = GenerationRequest("a red fox", "blurry", width=64, height=64, num_frames=9, num_inference_steps=2,
                                seed=1, video_stg_blocks=[1], audio_stg_blocks=[1])
        official = OfficialTwoStage(comps, tiling="none")
        ref_model = official.pipe.stage_1_model_ledger.transformer().velocity_model
        ours_ptrs = {p.untyped_storage().data_ptr() for p in comps.transformer.parameters()}
        assert all(p.untyped_storage().data_ptr() in ours_ptrs for p in ref_model.parameters())
        total, times, steps, latent = official.run(req, *ours.guidance(req), tmp_path / "official.mp4")
        assert len(steps["stage1_denoise"]) == 2 and len(steps["stage2_refine"]) == 3
        assert {"stage1_denoise", "upsample", "stage2_refine", "decode_and_write"} <= set(times)
        assert (tmp_path / "official.mp4").stat().st_size > 0
        pos, neg = stages.encode_text(comps, req.prompt, req.negative_prompt)
        mine = ours.latents(Run(req, torch.Generator().manual_seed(req.seed), pos, neg, stages.StageTimer(), None))[0]
        assert rel_err(mine, latent) <= TOL, rel_err(mine, latent)
    finally:
        torch.set_num_threads(n)
