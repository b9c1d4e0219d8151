"""The request planner (memory/planner.py) and the --max-gpu-memory surfaces: the plan is built from
estimate.py + weights_estimate.py + swap.py (no second formula), monotone where it must be, its
refusals name a largest frame count that is itself feasible; `ltx2-tp plan`; generate with streamed
blocks writes the unstreamed video; the server answers 400 over its cap."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ltx2_tp.cli import main
from ltx2_tp.memory.estimate import activation_bytes
from ltx2_tp.memory.planner import (FRAGMENTATION, GIB, SLOTS, Layout, PlanError, largest_frames, layouts, parse_bytes,
                                    plan_request)
from ltx2_tp.memory.swap import blocks_device_nbytes, device_nbytes
from ltx2_tp.memory.weights_estimate import model_block_bytes, non_block_weight_bytes
from ltx2_tp.models.ltx2.config import get_config
from ltx2_tp.models.ltx2.weights import build_model

BIG = get_config("ltx-2-19b")
FHD = dict(width=1920, height=1088)


def required(frames=1441, **kw):
    """The smallest cap a request needs (every block streamed, the smallest activation plan)."""
    kw.setdefault("max_gpu_memory_bytes", 1000 * GIB)
    return plan_request(BIG, num_frames=frames, **FHD, **kw).required


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("24000MiB") == 24000 * 2**20 and parse_bytes("1000") == 1000 and parse_bytes("1.5g") == 1.5e9
    for bad in ("24x", "", "-1GiB", "0"):
        with pytest.raises(ValueError, match="--max-gpu-memory"):
            parse_bytes(bad)


def test_required_memory_is_monotone():
    by_frames = [required(f) for f in (121, 481, 961, 1441, 2881)]
    assert by_frames == sorted(by_frames) and by_frames[0] < by_frames[-1]
    by_gpus = [required(num_gpus=n) for n in (1, 2, 4, 8)]
    assert by_gpus == sorted(by_gpus, reverse=True) and by_gpus[-1] < by_gpus[0]
    for storage in ("fp8-cast", "fp8-rowwise", "fp8-scaled-mm"):
        for f in (121, 1441):
            assert required(f, storage=storage) <= required(f), (storage, f)
    # a larger cap never makes a plan slower: resident blocks only grow
    ks = [plan_request(BIG, num_frames=481, **FHD, max_gpu_memory_bytes=c * GIB).resident_blocks for c in (16, 24, 40, 80)]
    assert ks == sorted(ks) and ks[-1] == BIG.num_layers


def test_prediction_is_the_estimates_sum():
    """peak = (resident + slots + non-block weights + activation_bytes) x margin, each from its module;
    the activation plan is what the model's PlanRule derives from the budget."""
    from ltx2_tp.memory.plan import plan_within

    for storage, gpus in (("bf16", 1), ("fp8-cast", 1), ("bf16", 2)):
        p = plan_request(BIG, num_frames=1441, **FHD, max_gpu_memory_bytes=24 * GIB, storage=storage, num_gpus=gpus)
        sizes = model_block_bytes(BIG, storage, p.layout.tp)
        transient = BIG.inner_dim ** 2 * BIG.ff_mult * 2 // p.layout.tp if storage == "fp8-cast" else 0
        weights = blocks_device_nbytes(sizes, p.resident_blocks, SLOTS) + non_block_weight_bytes(BIG, p.layout.tp) + transient
        assert p.peak <= 24 * GIB and 0 < p.resident_blocks < BIG.num_layers
        for ph in p.dit_phases:
            from ltx2_tp.memory.estimate import StepShape
            shape = StepShape(ph.tokens_per_rank, ph.audio_tokens, 1024, ph.batch, p.layout.tp, p.layout.ulysses,
                              p.layout.ring)
            assert ph.activations == activation_bytes(BIG, ph.plan, shape)
            assert ph.peak == math.ceil((weights + ph.activations) * (1 + FRAGMENTATION))
            assert plan_within(BIG, shape, p.plan_rule().activation_budget_bytes)[0] == ph.plan
        # one more resident block would not fit beside the largest stage
        more = blocks_device_nbytes(sizes, p.resident_blocks + 1, SLOTS) - blocks_device_nbytes(sizes, p.resident_blocks, SLOTS)
        assert max(ph.peak for ph in p.dit_phases) + more * (1 + FRAGMENTATION) > 24 * GIB


def test_weight_figures_match_a_built_model():
    """The planner's block and non-block bytes are those of a real (tiny) model, swap's layout."""
    cfg = get_config("tiny")
    model = build_model(cfg, dtype=torch.bfloat16, seed=0)
    sizes = model_block_bytes(cfg, "bf16")
    for k in range(cfg.num_layers + 1):
        assert blocks_device_nbytes(sizes, k) == device_nbytes(model, k)
    blocks = {id(t) for t in model.transformer_blocks.parameters()}
    rest = sum(t.numel() * t.element_size() for t in model.parameters() if id(t) not in blocks)
    assert non_block_weight_bytes(cfg) == rest


def test_layout_rule():
    assert layouts(BIG, 1) == [Layout()]
    assert layouts(BIG, 2)[0] == Layout(1, 2, 1) and Layout(2, 1, 1) in layouts(BIG, 2)
    p = plan_request(BIG, num_frames=121, **FHD, max_gpu_memory_bytes=40 * GIB, num_gpus=4)
    assert p.layout == Layout(1, 4, 1)  # SP first
    # SP replicates the 34.5 GiB of bf16 blocks; a cap below a streamed model with all of them resident
    # still fits by streaming, so TP is only chosen where SP cannot fit at all
    p = plan_request(BIG, num_frames=2881, **FHD, max_gpu_memory_bytes=6 * GIB, num_gpus=2)
    assert p.layout.num_gpus == 2 and p.peak <= 6 * GIB


def test_refusal_names_the_largest_frames_that_fit():
    cap = 3 * GIB
    with pytest.raises(PlanError) as e:
        plan_request(BIG, num_frames=1441, **FHD, max_gpu_memory_bytes=cap)
    f = e.value.largest_frames
    assert f is not None and (f - 1) % 8 == 0 and f"--num-frames {f}" in str(e.value)
    assert "--max-gpu-memory" in str(e.value)
    plan_request(BIG, num_frames=f, **FHD, max_gpu_memory_bytes=cap)  # feasible
    with pytest.raises(PlanError):
        plan_request(BIG, num_frames=f + 8, **FHD, max_gpu_memory_bytes=cap)
    assert largest_frames(BIG, num_frames=1441, **FHD, max_gpu_memory_bytes=cap) == f
    # fp8 storage or more GPUs named when that alone fits
    with pytest.raises(PlanError, match="fp8 storage"):
        plan_request(BIG, num_frames=1441, **FHD, max_gpu_memory_bytes=4 * GIB)
    with pytest.raises(PlanError, match="--num-gpus 2"):
        plan_request(BIG, num_frames=1441, **FHD, max_gpu_memory_bytes=4 * GIB)


def test_refusal_carries_the_plan_and_a_fixed_rule_is_counted():
    """A refusal's plan peaks at what the request needs as asked (weights + the smallest activation
    plans); given a built model's PlanRule, the activations counted are that rule's plans (the
    pipeline's fixed chunk budget: 10.4 GiB at 1920x1088x481 stage 2 against 1.9 with offload)."""
    from ltx2_tp.memory.plan import PlanRule, plan_within

    kw = dict(num_frames=481, **FHD, resident_blocks=BIG.num_layers)
    with pytest.raises(PlanError) as e:
        plan_request(BIG, max_gpu_memory_bytes=GIB, explain=False, **kw)
    rp = e.value.plan
    weights = non_block_weight_bytes(BIG) + sum(model_block_bytes(BIG))
    least = max(plan_within(BIG, _shape(p), 0)[1] for p in rp.dit_phases)
    assert rp.peak == math.ceil((weights + least) * (1 + FRAGMENTATION)) > GIB
    rule = PlanRule(budget_bytes=2 * GIB)
    with pytest.raises(PlanError) as e:
        plan_request(BIG, max_gpu_memory_bytes=GIB, explain=False, plan_rule=rule, **kw)
    fixed = e.value.plan
    for p in fixed.dit_phases:
        assert p.plan == rule.for_step(BIG, _shape(p)) and p.activations == activation_bytes(BIG, p.plan, _shape(p))
    assert fixed.peak > rp.peak + 8 * GIB
    plan_request(BIG, max_gpu_memory_bytes=44 * GIB, **kw)  # the planner's own plans fit 44 GiB, the rule's do not
    with pytest.raises(PlanError):
        plan_request(BIG, max_gpu_memory_bytes=44 * GIB, plan_rule=rule, **kw)


def _shape(phase):
    """The StepShape the planner gave a DiT phase (one 19B GPU, bf16)."""
    from ltx2_tp.memory.estimate import StepShape
    from ltx2_tp.memory.planner import TEXT_TOKENS

    return StepShape(phase.tokens_per_rank, phase.audio_tokens, TEXT_TOKENS, phase.batch)


def test_cli_plan_table_and_exit_code(capsys):
    assert main(["plan", "--width", "1920", "--height", "1088", "--num-frames", "1441", "--max-gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    for s in ("stage1", "stage2", "text_encoder", "vae_decode", "resident", "streamed", "peak/rank", "960x544x1441",
              "369240"):
        assert s in out, s
    assert main(["plan", "--width", "1920", "--height", "1088", "--num-frames", "1441", "--max-gpu-memory", "5GiB"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-frames" in err and "smallest change" in err
    for flags, msg in ((["--max-gpu-memory", "24x"], "--max-gpu-memory: expected a size"),
                       (["--num-frames", "24"], "--num-frames: must be 8k+1"),
                       (["--width", "96"], "--width: must be a multiple of 64"),
                       (["--tp-size", "3", "--num-gpus", "3"], "tp_size=3 must divide")):
        base = {"--width": "1920", "--height": "1088", "--num-frames": "121", "--max-gpu-memory": "24GiB"}
        base.update(dict(zip(flags[::2], flags[1::2])))
        assert main(["plan", *[x for kv in base.items() for x in kv]]) == 2, flags
        assert msg in capsys.readouterr().err, flags


def test_generate_memory_flags_are_checked_first(capsys):
    base = ["generate", "--prompt", "x", "--width", "128", "--height", "128", "--num-frames", "9"]
    for flags, msg in ((["--resident-blocks", "5"], "--resident-blocks must be in [0, 2]"),
                       (["--resident-blocks", "some"], "--resident-blocks: expected auto or an integer"),
                       (["--resident-blocks", "auto"], "--resident-blocks auto needs --max-gpu-memory"),
                       (["--resident-blocks", "1", "--weight-source", "file"], "--weight-source file reads the checkpoint"),
                       (["--weight-source", "file"], "--weight-source file streams blocks"),
                       (["--max-gpu-memory", "1KiB"], "--max-gpu-memory: 128x128x9 does not fit")):
        assert main([*base, *flags]) == 2, flags
        assert msg in capsys.readouterr().err, flags
    for flags, msg in ((["--max-gpu-memory", "1KiB"], "--max-gpu-memory: even the smallest request does not fit"),
                       (["--resident-blocks", "auto"], "--resident-blocks auto needs --max-gpu-memory")):
        assert main(["serve", *flags]) == 2, flags
        assert msg in capsys.readouterr().err, flags


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ltx2_tp.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_generate_streamed_under_a_cap_writes_the_resident_video(tmp_path):
    """--max-gpu-memory with one of the tiny model's two blocks resident (the other streamed: CPU
    copies) writes the video of the plain run, bit for bit, and reports the prediction."""
    from test_pipeline import probe

    args = ["generate", "--prompt", "a fox", "--width", "128", "--height", "128", "--num-frames", "9",
            "--num-inference-steps", "2"]
    r = _cli(*args, "--output-path", str(tmp_path / "a.mp4"))
    assert r.returncode == 0, r.stderr
    r = _cli(*args, "--max-gpu-memory", "1GiB", "--resident-blocks", "1", "--output-path", str(tmp_path / "b.mp4"))
    assert r.returncode == 0, r.stderr
    assert "1 resident / 1 streamed" in r.stdout and "predicted peak" in r.stdout
    assert np.array_equal(probe(tmp_path / "a.mp4")[0], probe(tmp_path / "b.mp4")[0])


# ---- serve / sglang under a cap plan as generate does (planning.request_plan) -------------------
# The tiny model at 64x64 (fp32, every block streamed: what serve --max-gpu-memory builds), with
# tiles of tile_frames 24 / overlap 16 = 17 frames: a 25-frame video is 2 tiles. Weights are most of
# the tiny model's plan (about 2.87 MB); each 8 frames add about 2.5 KB of activations.
TILE = {"tile_frames": 24, "tile_overlap_frames": 16}


def _capped_check():
    """(the server's CapCheck as serve's _server_cap makes it, the cap): the cap is halfway between
    what one tile (17 frames) needs and what the whole 25 frames need, so the whole video does not
    fit in one piece and one tile does."""
    from dataclasses import replace

    from ltx2_tp.pipelines.planning import CapCheck
    from ltx2_tp.pipelines.registry import get_pipeline_class

    check = CapCheck(get_config("tiny"), get_pipeline_class("LTX2LongVideo"), 1, Layout(), None, 0, "tiny", 4)
    need = {}
    for f in (17, 25):
        with pytest.raises(PlanError) as e:
            check.plan(64, 64, f, 24.0, explain=False)
        need[f] = e.value.plan.peak
    cap = (need[17] + need[25]) // 2
    print(f"64x64 needs: one tile (17 frames) {need[17]} B, the whole 25 frames {need[25]} B; cap {cap} B")
    assert need[17] < cap < need[25]
    return replace(check, cap=cap), cap


def _capped_components(cap_check=None):
    """Tiny components as a capped server builds them: every block streamed (--resident-blocks auto ->
    0), the cap applied (apply_plan) when a CapCheck is given."""
    from ltx2_tp.memory.swap import enable_block_swap
    from ltx2_tp.pipelines.planning import apply_plan
    from ltx2_tp.pipelines.tiny import build_tiny_components

    comps = build_tiny_components(0)
    enable_block_swap(comps.transformer, 0, "host", device=comps.device)
    if cap_check is not None:
        apply_plan(cap_check.plan(64, 64, 1, 24.0), comps)
    return comps


def _fits(check, frames: int) -> bool:
    try:
        check.plan(64, 64, frames, 24.0, explain=False)
        return True
    except PlanError:
        return False


def test_server_refuses_a_request_over_its_cap(tmp_path, caplog):
    """serve --max-gpu-memory plans a request as generate does: an auto request whose whole video is
    over the cap but whose tile fits is accepted and runs tiled (the job log says so, the video has
    every frame); a request whose tile does not fit, or a dense one over the cap, is a 400 naming
    tile_frames / num_frames / seconds with the largest value that fits."""
    import json

    from fastapi.testclient import TestClient

    from ltx2_tp.media_stream import EncoderOptions
    from ltx2_tp.serving.api import create_app
    from ltx2_tp.serving.jobs import JobManager
    from ltx2_tp.serving.pipelines import ServedPipelines
    from test_pipeline import probe

    check, cap = _capped_check()
    pipes = ServedPipelines(_capped_components(check), "LTX2LongVideo", "ltx-2-tiny", steps=1,
                            encoder_options=EncoderOptions(preset="ultrafast"), fixed_plan_rule=True)
    manager = JobManager(pipes, tmp_path, 2, 60, idle_poll_s=0.05)
    base = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 1}
    try:
        client = TestClient(create_app(manager, cap=check, pipelines=pipes))
        with caplog.at_level("INFO", logger="ltx2_tp.serving.jobs"):
            r = client.post("/v1/videos", json={**base, "num_frames": 25, **TILE})  # long_video_mode auto
            assert r.status_code == 200, r.json()
            vid = r.json()["id"]
            for _ in range(1200):
                if (job := manager.get(vid)).status in ("completed", "failed"):
                    break
                time.sleep(0.05)
        assert job.status == "completed", job.error
        lines = [json.loads(x.getMessage()) for x in caplog.records if x.name == "ltx2_tp.serving.jobs"]
        started = next(x for x in lines if x["id"] == vid and x["status"] == "in_progress")
        assert (started["long_video_mode"], started["tiles"]) == ("tiled", 2), started
        assert started["mode_reason"].startswith("auto: one piece needs"), started
        video = tmp_path / "v.mp4"
        video.write_bytes(client.get(f"/v1/videos/{vid}/content").content)
        assert len(probe(video)[0]) == 25

        def refused(fields, param):
            r = client.post("/v1/videos", json={**base, **fields})
            assert r.status_code == 400, r.json()
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error", err
            return err["message"]

        # the tile (25 frames: tile_frames 32) does not fit either: the largest tile_frames that does
        msg = refused({"num_frames": 41, "tile_frames": 32, "tile_overlap_frames": 16}, "tile_frames")
        assert "one tile (25 frames: tile_frames 32)" in msg, msg
        best = int(msg.rsplit(" ", 1)[1])
        assert best == 24 and _fits(check, best - 7) and not _fits(check, best + 1)  # 24 -> 17 frames; 32 -> 25
        # dense over the cap, and auto whose one tile is the whole video (default tile_frames 80)
        for fields in ({"num_frames": 25, "long_video_mode": "dense"}, {"num_frames": 25}):
            msg = refused(fields, "num_frames")
            best = int(msg.rsplit(" ", 1)[1])
            assert best == 17 and _fits(check, best) and not _fits(check, best + 8), msg
        for mode in ("dense", "auto"):
            msg = refused({"seconds": "1", "long_video_mode": mode}, "seconds")  # 1 s -> 25 frames
            assert f"{16 / 24:g} seconds (17 frames at 24 fps)" in msg, msg
    finally:
        manager.close()


def test_generate_refuses_a_tile_over_the_cap(capsys):
    """generate's refusal through the same helper: a tile over the cap names --tile-frames."""
    check, cap = _capped_check()
    args = ["generate", "--prompt", "x", "--width", "64", "--height", "64", "--num-frames", "41",
            "--tile-frames", "32", "--tile-overlap-frames", "16", "--max-gpu-memory", str(cap)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--max-gpu-memory: one tile (25 frames, --tile-frames) of the tiled video: 64x64x25 does not fit" in err


def test_sglang_request_over_the_cap_names_num_frames(monkeypatch):
    """sglang's check (LTX2_TP_MAX_GPU_MEMORY) plans as generate and serve do: the components as
    built (CapCheck.built) under the environment's cap; an auto request whose tile fits is taken and
    the pipeline then chooses tiled; one whose tile does not fit, or a dense one over the cap, is a
    RequestError naming tile_frames / num_frames with the largest value that fits."""
    from dataclasses import replace
    from types import SimpleNamespace

    from ltx2_tp.integrations.sglang import MAX_GPU_MEMORY_ENV, request_from_sglang, sglang_cap
    from ltx2_tp.pipelines.registry import get_pipeline_class
    from ltx2_tp.pipelines.request import RequestError

    server_check, cap = _capped_check()
    comps = _capped_components()  # as build_components_for_sglang with the cap: every block streamed
    cls = get_pipeline_class("LTX2LongVideo")
    pipe = cls(comps)  # built before the cap is applied, as create_pipeline_stages does
    assert sglang_cap(comps, cls) is None
    monkeypatch.setenv(MAX_GPU_MEMORY_ENV, str(cap))
    check = sglang_cap(comps, cls)
    assert (check.cap, check.storage, check.resident_blocks, check.dtype_bytes) == (cap, "bf16", 0, 4)
    assert comps.max_gpu_memory == cap  # applied: the pipeline's auto mode plans under it
    for f in (17, 25):  # the built model's inputs plan as the server's
        assert _fits(check, f) == _fits(server_check, f) == (f == 17)

    def batch(frames, **kw):
        return SimpleNamespace(prompt=["x"], width=64, height=64, num_frames=frames, fps=24.0, num_inference_steps=1,
                               guidance_scale=3.0, seed=[0], **kw)

    req = request_from_sglang(batch(25, **TILE), check)
    choice = pipe.choose_mode(req)
    assert (choice.mode, len(choice.tiles), choice.tiles[0].frames) == ("tiled", 2, 17), choice
    with pytest.raises(RequestError, match="tile_frames: one tile .25 frames: tile_frames 32.") as e:
        request_from_sglang(batch(41, tile_frames=32, tile_overlap_frames=16), check)
    assert str(e.value).endswith("the most that fits at this size: tile_frames 24")
    with pytest.raises(RequestError) as e:  # the default overlap (24) does not leave a 24-frame tile 8 new frames
        request_from_sglang(batch(41, tile_frames=32), check)
    assert str(e.value).endswith("tile_frames 24 (with tile_overlap_frames at most 16)")
    with pytest.raises(RequestError, match="at any tile length .tile_frames >= 24.; use a smaller size"):
        request_from_sglang(batch(41, **TILE), replace(check, cap=check.cap - 2 * 2**10))  # 17 frames over
    with pytest.raises(RequestError, match="num_frames: 25 frames at 64x64 do not fit") as e:
        request_from_sglang(batch(25, long_video_mode="dense"), check)
    assert str(e.value).endswith("the most that fits at this size: 17")


def test_a_text_encoder_kept_on_the_gpu_is_counted_in_every_phase():
    """Gemma on the GPU stays there for the whole request: with room for it (64 GiB) it is a fixed
    weight of every DiT phase and the peaks stay under the cap; where the request does not fit with
    it (24 GiB) it goes to the host (review finding: it was left out of the DiT phases)."""
    from ltx2_tp.memory.planner import GEMMA3_12B_BYTES

    kw = dict(num_frames=241, **FHD, text_encoder_bytes=GEMMA3_12B_BYTES)
    on_gpu = plan_request(BIG, max_gpu_memory_bytes=64 * GIB, **kw)
    assert not on_gpu.text_encoder_on_host
    assert all(p.other == GEMMA3_12B_BYTES and p.peak <= 64 * GIB for p in on_gpu.dit_phases)
    alone = plan_request(BIG, max_gpu_memory_bytes=64 * GIB, **{**kw, "text_encoder_bytes": 0})
    assert on_gpu.resident_blocks < alone.resident_blocks  # the encoder takes room blocks had
    assert plan_request(BIG, max_gpu_memory_bytes=24 * GIB, **kw).text_encoder_on_host


def test_a_built_encoder_on_the_gpu_is_counted_as_built():
    """A CapCheck of built components carries the encoder's device bytes (CapCheck.built): the
    planner then counts exactly those in every phase and never moves it to the host."""
    from ltx2_tp.pipelines.planning import plan_pipeline
    from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline as cls

    kw = dict(width=1920, height=1088, num_frames=241, fps=24.0, cap=64 * GIB, model="ltx-2-19b")
    placed = plan_pipeline(BIG, cls, **kw)  # the planner places Gemma: on the GPU at 64 GiB
    built = plan_pipeline(BIG, cls, **kw, encoder_on_gpu=placed.phases[1].other)
    assert not placed.text_encoder_on_host and placed.phases[1].other > 0
    assert built.peak == placed.peak and built.resident_blocks == placed.resident_blocks
    with pytest.raises(PlanError):  # at 24 GiB a built 22.7 GiB encoder leaves no room; the planner would move it
        plan_pipeline(BIG, cls, **{**kw, "cap": 24 * GIB}, encoder_on_gpu=placed.phases[1].other)
    assert plan_pipeline(BIG, cls, **{**kw, "cap": 24 * GIB}).text_encoder_on_host
