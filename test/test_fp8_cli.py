"""--quantization / --fp8 on the command line and through the checkpoint files: Lightricks-layout files
whose DiT is an fp8 checkpoint (written with ltx-core's quantization function) are recognised without a
flag; refusals name the flag and the allowed values, before anything is built."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from ltx2_tp.cli import main
from ltx2_tp.models.ltx2.quantization import describe
from ltx2_tp.pipelines.checkpoints import build_components
from ltx2_tp.pipelines.registry import get_pipeline_class
from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.pipelines.tiny import build_tiny_components, write_official_files

pytest.importorskip("ltx_core")
GEN = ["generate", "--prompt", "a fox", "--num-frames", "9", "--width", "128", "--height", "128",
       "--num-inference-steps", "2", "--text-encoder-path", "tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    """The tiny model's official files (with a distilled LoRA), its DiT stored as Lightricks' fp8 files are."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from test_fp8_checkpoints import scaled_state_dict

    folder = tmp_path_factory.mktemp("ltx2_fp8")
    ckpt = write_official_files(build_tiny_components(seed=0), folder, lora_rank=2)
    prefix = "model.diffusion_model."
    with safe_open(str(ckpt), framework="pt") as h:
        meta = h.metadata()
        sd = {k: h.get_tensor(k) for k in h.keys()}
    dit = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd.update({prefix + k: v for k, v in scaled_state_dict(dit).items()})
    ckpt.unlink()
    save_file(sd, str(folder / "ltx-2-tiny-dev-fp8.safetensors"), metadata=meta)
    assert "transformer" in json.loads(meta["config"])
    return folder


def test_refusals_name_the_flag(fp8_folder, capsys):
    cases = [
        (["dit", "--quantization", "fp8-scaled-mm", "--device", "cpu"],
         "--quantization fp8-scaled-mm: needs a CUDA device (torch._scaled_mm), got --device cpu"),
        (["dit", "--quantization", "int8"], "argument --quantization: invalid choice: 'int8'"),
        ([*GEN, "--fp8", "--quantization", "fp8-cast"], "--fp8 is --quantization fp8-rowwise; it conflicts with "
                                                       "--quantization fp8-cast"),
        ([*GEN, "--model-path", str(fp8_folder)],
         f"--model-path {fp8_folder}/ltx-2-tiny-dev-fp8.safetensors: an fp8 checkpoint (fp8 with per-tensor scales"),
        ([*GEN, "--model-path", str(fp8_folder)], "runs fp8 matmuls, which needs a CUDA device"),
        ([*GEN, "--model-path", str(fp8_folder)], "--quantization fp8-cast runs it with bf16 compute"),
        ([*GEN, "--model-path", str(fp8_folder), "--quantization", "fp8-rowwise"],
         "--quantization fp8-rowwise: the checkpoint is already fp8 with per-tensor scales"),
        ([*GEN, "--model-path", str(fp8_folder), "--fp8"], "--fp8 (--quantization fp8-rowwise: the checkpoint is "
                                                            "already fp8"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) if "invalid choice" in msg else _nothing():
            assert main(argv) == 2
        assert msg in capsys.readouterr().err, argv


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_dit_with_each_on_load_quantization(capsys):
    for q in ("fp8-cast",):  # the fp8 matmuls are refused on the CPU (test_refusals_name_the_flag)
        assert main(["dit", "--quantization", q, "--num-frames", "9", "--height", "96", "--width", "160",
                     "--repeat", "1"]) == 0
        assert f"quantization={q}" in capsys.readouterr().out


def test_fp8_checkpoint_runs_the_two_stage_pipeline_as_fp8_cast(fp8_folder, tmp_path):
    """Lightricks' fp8 format with --quantization fp8-cast: fp8 storage, bf16 compute, and the distilled
    LoRA fused into the fp8 weights for stage 2 (and removed after)."""
    comps = build_components(str(fp8_folder), text_encoder_path="tiny", quantization="fp8-cast")
    assert comps.stage2_lora is not None
    assert describe(comps.transformer) == "20 bf16, 20 fp8-cast (scaled) block linears"  # block 0 bf16, 1 fp8
    before = {k: v.clone() for k, v in comps.transformer.state_dict().items()}
    req = GenerationRequest(prompt="a fox", width=128, height=128, num_frames=9, num_inference_steps=2, seed=4)
    out = get_pipeline_class("LTX2TwoStagePipeline")(comps)(req, tmp_path / "v.mp4")
    with av.open(str(out.path)) as f:
        frames = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
    assert frames.shape == (9, 128, 128, 3)
    after = comps.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
