"""ltx-pipelines 1.0.0's own TI2VidTwoStagesPipeline over our in-memory components: the same weights,
no checkpoint file, for bench_request.py's side-by-side table.

ltx-pipelines builds every model through a ModelLedger that reads checkpoint files; writing 19 B random
weights to safetensors costs ~40 GB of disk and minutes, and two resident copies (ours and theirs,
35 GiB each in bf16) do not fit beside the activations on an 80 GB H100. So the pipeline object is
made without its __init__ and given `MemoryLedger`, which hands out
- transformer(): X0Model(ltx-core's LTXModel) whose parameters ARE our DiT's tensors (its official
  keys as views, the fused q/k/v rows narrowed: no copy, no extra memory; our DiT is bit-identical
  to ltx-core at identical weights: test/test_parity_ltx_core.py);
- video_encoder / spatial_upsampler / video_decoder / audio_decoder / vocoder: the same ltx-core
  modules our pipeline runs.
`encode_prompts` returns our text encoder's contexts (Gemma is not timed on either side). The
pipeline's code runs unmodified otherwise: its per-pass guided denoising (one DiT forward per
guidance pass), its cleanup_memory calls, the stage-2 transformer, its decoders and encode_video
with the tiling its own entry point uses (TilingConfig.default()). What it does not pay here: loading
the transformer from disk for each stage (its ledger builds a fresh model per call).

Stage times come from wrapping the module-level functions the pipeline calls (its
euler_denoising_loop for the two stages, with a timed denoise_fn per step; upsample_video).
"""

from __future__ import annotations

import contextlib
import time
import types

import torch


def shared_ltx_core_transformer(c):
    """ltx-core's LTXModel holding our DiT's parameters (views, single rank)."""
    from common import ltx_core_on_meta
    from ltx_core.model.transformer.model import X0Model

    from ltx2_tp.models.ltx2.weights import checkpoint_spec

    if c.ctx.tp_size != 1:
        raise ValueError("the ltx-pipelines comparison runs on one rank (tp_size 1)")
    views = {}
    for key, e in checkpoint_spec(c.transformer).items():
        t = e.param.detach()
        views[key] = t.narrow(0, e.shard * e.shape[0], e.shape[0]) if e.shard is not None else t
    ref = ltx_core_on_meta(c.transformer.cfg)
    ref.load_state_dict(views, strict=True, assign=True)
    return X0Model(ref.eval())


class MemoryLedger:
    """What TI2VidTwoStagesPipeline asks its ModelLedger for, from memory."""

    def __init__(self, c):
        self.c = c
        self._transformer = shared_ltx_core_transformer(c)

    def transformer(self):
        return self._transformer

    def video_encoder(self):
        return self.c.video_encoder

    def spatial_upsampler(self):
        return self.c.upsampler

    def video_decoder(self):
        return self.c.video_decoder

    def audio_decoder(self):
        return self.c.audio_decoder

    def vocoder(self):
        return self.c.vocoder


class _Torch(types.ModuleType):
    """torch as an ltx-pipelines module sees it on a CPU check run: its hard-coded bfloat16 is the
    components' dtype (fp32 on CPU) and there is no CUDA to synchronize."""

    def __init__(self, dtype):
        super().__init__("torch")
        self.bfloat16 = dtype
        self.cuda = types.SimpleNamespace(synchronize=lambda *a, **k: None, empty_cache=lambda: None,
                                          is_available=lambda: False)

    def __getattr__(self, name):
        return getattr(torch, name)


class OfficialTwoStage:
    """`run(req, video_params, audio_params, path)` -> (seconds, stage seconds, per-step seconds, final
    video latent): one request through ltx-pipelines' TI2VidTwoStagesPipeline and its encode_video."""

    def __init__(self, c, tiling: str = "default"):
        import ltx_pipelines.ti2vid_two_stages as module
        from ltx_core.model.video_vae import TilingConfig
        from ltx_pipelines.utils.types import PipelineComponents

        self.c, self.module = c, module
        self.tiling = TilingConfig.default() if tiling == "default" else None
        pipe = object.__new__(module.TI2VidTwoStagesPipeline)  # its __init__ builds file ledgers
        pipe.device, pipe.dtype = c.device, c.dtype
        pipe.stage_1_model_ledger = pipe.stage_2_model_ledger = MemoryLedger(c)  # no LoRA: random weights have none
        pipe.pipeline_components = PipelineComponents(dtype=c.dtype, device=c.device)
        pipe.pipeline_components.video_latent_channels = c.video_latent_channels
        self.pipe = pipe

    def _sync(self):
        if self.c.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def _patched(self, req, record):
        import ltx_pipelines.utils.helpers as helpers
        from ltx_core.types import AudioLatentShape

        m, c = self.module, self.c
        saved = []

        def put(obj, name, value):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

        def encode_prompts(prompts, ledger, **kw):  # our text encoder's contexts, as our pipeline gets them
            from ltx2_tp.pipelines.stages import encode_prompt

            return [types.SimpleNamespace(video_encoding=v, audio_encoding=a)
                    for v, a in (encode_prompt(c, p) for p in prompts)]

        loop, upsample = m.euler_denoising_loop, m.upsample_video

        def timed_loop(sigmas, video_state, audio_state, stepper, denoise_fn):
            stage = "stage1_denoise" if "stage1_denoise" not in record["stages"] else "stage2_refine"
            steps = record["steps"].setdefault(stage, [])

            def timed_fn(*a, **k):
                t = time.perf_counter()
                out = denoise_fn(*a, **k)
                self._sync()
                steps.append(time.perf_counter() - t)
                return out

            self._sync()
            t0 = time.perf_counter()
            out = loop(sigmas=sigmas, video_state=video_state, audio_state=audio_state, stepper=stepper,
                       denoise_fn=timed_fn)
            self._sync()
            record["stages"][stage] = time.perf_counter() - t0
            record["last_loop_end"] = time.perf_counter()
            return out

        def timed_upsample(*a, **k):
            self._sync()
            t0 = time.perf_counter()
            out = upsample(*a, **k)
            self._sync()
            record["stages"]["upsample"] = time.perf_counter() - t0
            return out

        decode_video = m.vae_decode_video

        def recorded_decode(latent, *a, **k):
            record["video_latent"] = latent.detach().clone()
            return decode_video(latent, *a, **k)

        put(m, "encode_prompts", encode_prompts)
        put(m, "euler_denoising_loop", timed_loop)
        put(m, "upsample_video", timed_upsample)
        put(m, "vae_decode_video", recorded_decode)
        if c.device.type != "cuda" or c.dtype != torch.bfloat16:  # a CPU check run (tiny, fp32)
            shim = _Torch(c.dtype)
            put(m, "torch", shim)
            put(helpers, "torch", shim)
        if (c.audio_latent_channels, c.audio_mel_bins) != (8, 16):  # ltx-core's AudioLatentShape defaults (LTX-2)
            ch, mel = c.audio_latent_channels, c.audio_mel_bins

            class Shape(AudioLatentShape):
                @staticmethod
                def from_video_pixel_shape(shape, channels=ch, mel_bins=mel, *a, **k):
                    return AudioLatentShape.from_video_pixel_shape(shape, channels, mel_bins, *a, **k)

            put(helpers, "AudioLatentShape", Shape)
        try:
            yield
        finally:
            for obj, name, value in reversed(saved):
                setattr(obj, name, value)

    def run(self, req, video_params, audio_params, path):
        from ltx_pipelines.utils.media_io import encode_video
        from ltx_core.model.video_vae import get_video_chunks_number

        record = {"stages": {}, "steps": {}}
        with self._patched(req, record), torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            video, audio = self.pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed,
                                     height=req.height, width=req.width, num_frames=req.num_frames,
                                     frame_rate=req.fps, num_inference_steps=req.num_inference_steps,
                                     video_guider_params=video_params, audio_guider_params=audio_params,
                                     images=[], tiling_config=self.tiling)
            encode_video(video=video, fps=req.fps, audio=audio, output_path=str(path),
                         video_chunks_number=get_video_chunks_number(req.num_frames, self.tiling))
            self._sync()
            end = time.perf_counter()
        stages = record["stages"]
        stages["decode_and_write"] = end - record["last_loop_end"]  # audio decode in __call__ + video decode/encode
        stages["other"] = end - t0 - sum(stages.values())  # prompts, noise, conditionings, cleanup_memory
        return end - t0, stages, record["steps"], record["video_latent"]
