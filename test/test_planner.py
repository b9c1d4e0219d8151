"""The request planner (memory/planner.py) and the --max-gpu-memory surfaces: the plan is built from
estimate.py + weights_estimate.py + swap.py (no second formula), monotone where it must be, its
refusals name a largest frame count that is itself feasible; `ltx2-tp plan`; generate with streamed
blocks writes the unstreamed video; the server answers 400 over its cap."""

from __future__ import annotations

import math
import os
import subprocess
import sys

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


def test_server_refuses_a_request_over_its_cap(tmp_path):
    from fastapi.testclient import TestClient

    from ltx2_tp.pipelines.planning import CapCheck
    from ltx2_tp.pipelines.registry import get_pipeline_class
    from ltx2_tp.serving.api import create_app
    from ltx2_tp.serving.jobs import JobManager

    cls = get_pipeline_class("LTX2LongVideo")
    cfg = get_config("tiny")
    cap = CapCheck(cfg, cls, 2_890_000, Layout(), None, 0, "tiny", 4)  # fits 128x128x33, not x97 (fp32)
    fits = lambda f: cap.plan(128, 128, f, 24.0)  # noqa: E731
    fits(33)
    manager = JobManager(object(), tmp_path, 1, 60)
    try:
        client = TestClient(create_app(manager, cap=cap))
        r = client.post("/v1/videos", json={"prompt": "x", "size": "128x128", "num_frames": 97})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "num_frames" and err["type"] == "invalid_request_error"
        best = int(err["message"].rsplit(" ", 1)[1])
        fits(best)
        with pytest.raises(PlanError):
            fits(best + 8)
        r = client.post("/v1/videos", json={"prompt": "x", "size": "128x128", "seconds": "4"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seconds"
        assert f"{(best - 1) / 24:g} seconds" in r.json()["error"]["message"]
    finally:
        manager.close()


def test_sglang_request_over_the_cap_names_num_frames(monkeypatch):
    """The sglang adapter's check (LTX2_TP_MAX_GPU_MEMORY): the same helper, sglang's request error."""
    from types import SimpleNamespace

    from ltx2_tp.integrations.sglang import MAX_GPU_MEMORY_ENV, request_from_sglang, sglang_cap
    from ltx2_tp.pipelines.registry import get_pipeline_class
    from ltx2_tp.pipelines.request import RequestError
    from ltx2_tp.pipelines.tiny import build_tiny_components

    comps = build_tiny_components(0)
    cls = get_pipeline_class("LTX2LongVideo")
    assert sglang_cap(comps, cls) is None
    monkeypatch.setenv(MAX_GPU_MEMORY_ENV, "2890000")
    cap = sglang_cap(comps, cls)
    batch = lambda f: SimpleNamespace(prompt=["x"], width=128, height=128, num_frames=f, fps=24.0,  # noqa: E731
                                      num_inference_steps=2, guidance_scale=3.0, seed=[0])
    assert request_from_sglang(batch(33), cap).num_frames == 33
    with pytest.raises(RequestError, match="num_frames: 97 frames at 128x128 do not fit") as e:
        request_from_sglang(batch(97), cap)
    cap.plan(128, 128, int(str(e.value).rsplit(" ", 1)[1]), 24.0)
