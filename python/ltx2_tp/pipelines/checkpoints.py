"""Official checkpoint files -> LTX2Components.

Lightricks publishes LTX-2 as: one checkpoint safetensors holding the transformer
(`model.diffusion_model.*`), the video VAE (`vae.*`), the audio VAE (`audio_vae.*`), the vocoder
(`vocoder.*`) and the text connectors, with a `config` JSON in its metadata; the distilled LoRA
for stage 2; the x2 spatial upsampler; and the Gemma 3 text encoder folder. ltx-core's model
builders (through ltx-pipelines' ModelLedger, with its key filters) load every part but the DiT;
our loader (models/ltx2/weights.py) loads the DiT onto this rank's TP shard.

`--model-path` may be that folder (files found by name) or the checkpoint file itself, with the
others given by their own flags. Each missing file is reported naming the flag that supplies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.models.ltx2.config import LTX2Config
from ltx2_tp.models.ltx2.lora import LoraWeights
from ltx2_tp.models.ltx2.quantization import build_transformer
from ltx2_tp.models.ltx2.weights import read_checkpoint_config
from ltx2_tp.pipelines.components import LTX2Components
from ltx2_tp.pipelines.request import RequestError
from ltx2_tp.pipelines.tiny import TINY_TEXT_ENCODER, TINY_TEXT_KEY, TinyTextEncoder, build_tiny_components


@dataclass
class CheckpointFiles:
    checkpoint: str
    spatial_upsampler: str
    text_encoder: str  # Gemma root folder, or "tiny"
    distilled_lora: str | None = None
    distilled_lora_strength: float = 1.0

    @classmethod
    def discover(cls, model_path: str, spatial_upsampler: str | None = None, text_encoder: str | None = None,
                 distilled_lora: str | None = None, distilled_lora_strength: float = 1.0) -> "CheckpointFiles":
        """Resolve the files from a folder as Lightricks lays it out, or from explicit paths."""
        root = Path(model_path)
        if not root.exists():
            raise RequestError("model_path", f"no such file or directory: {model_path}")
        if root.is_file():
            checkpoint, folder = root, root.parent
        else:
            folder = root
            candidates = [p for p in sorted(folder.glob("*.safetensors"))
                          if not any(s in p.name for s in ("upscaler", "upsampler", "lora"))]
            if len(candidates) != 1:
                raise RequestError("model_path", f"expected one LTX-2 checkpoint *.safetensors in {folder} (besides "
                                   f"the upsampler and LoRA files), found {[p.name for p in candidates]}")
            checkpoint = candidates[0]

        def pick(value: str | None, flag: str, patterns: tuple[str, ...], required: bool) -> str | None:
            if value is not None:
                if value != TINY_TEXT_ENCODER and not Path(value).exists():
                    raise RequestError(flag, f"no such file or directory: {value}")
                return value
            for pat in patterns:
                found = sorted(folder.glob(pat))
                if found:
                    return str(found[0])
            if required:
                raise RequestError(flag, f"not given and nothing matching {list(patterns)} in {folder}")
            return None

        return cls(
            checkpoint=str(checkpoint),
            spatial_upsampler=pick(spatial_upsampler, "spatial_upsampler_path",
                                   ("*spatial-upscaler*.safetensors", "*upsampler*.safetensors"), True),
            text_encoder=pick(text_encoder, "text_encoder_path", ("gemma*", "text_encoder"), True),
            distilled_lora=pick(distilled_lora, "distilled_lora_path", ("*distilled-lora*.safetensors",), False),
            distilled_lora_strength=distilled_lora_strength,
        )


class CheckpointTextEncoder(torch.nn.Module):
    """Gemma 3 -> ltx-core's embeddings processor (feature extractor + connectors): prompt ->
    (video context, audio context), as ltx-pipelines' encode_prompts. Both stay resident."""

    def __init__(self, gemma: torch.nn.Module, processor: torch.nn.Module):
        super().__init__()
        self.gemma, self.processor = gemma, processor

    @torch.no_grad()
    def forward(self, prompt: str):
        hidden, mask = self.gemma.encode(prompt)
        out = self.processor.process_hidden_states(hidden, mask)
        return out.video_encoding, out.audio_encoding


def build_checkpoint_components(files: CheckpointFiles, device: str | torch.device = "cpu",
                                dtype: torch.dtype = torch.bfloat16, ctx: ParallelContext = SINGLE,
                                quantization: str | None = None, resident_blocks: int | None = None,
                                source: str = "host", text_encoder_device: str | torch.device | None = None):
    from ltx_pipelines.utils.model_ledger import ModelLedger

    device = torch.device(device)
    meta = read_checkpoint_config([files.checkpoint])
    if meta is None or "transformer" not in meta:
        raise RequestError("model_path", f"{files.checkpoint} carries no 'config' metadata with a transformer entry "
                           "(official LTX-2 checkpoints do)")
    cfg = LTX2Config.from_checkpoint_config(meta)
    cfg.validate_parallel(ctx.tp_size, ctx.ulysses_size)
    gemma = None if files.text_encoder == TINY_TEXT_ENCODER else files.text_encoder
    # VAE / audio / vocoder / upsampler in fp32 on CPU, the working dtype on GPU (as ltx-pipelines)
    aux_dtype = torch.float32 if device.type == "cpu" else dtype
    ledger = ModelLedger(dtype=aux_dtype, device=device, checkpoint_path=files.checkpoint, gemma_root_path=gemma,
                         spatial_upsampler_path=files.spatial_upsampler)
    if gemma is None:
        text_encoder = TinyTextEncoder(cfg.caption_channels).to(device)
        from safetensors import safe_open

        with safe_open(files.checkpoint, framework="pt") as h:
            if TINY_TEXT_KEY in h.keys():
                text_encoder.table.weight.data.copy_(h.get_tensor(TINY_TEXT_KEY))
    elif text_encoder_device is not None:  # the planner: Gemma does not fit beside the DiT (encode_prompt
        # moves its outputs to `device`); bf16 on the host too (fp32 Gemma 3 12B would take 49 GB of RAM)
        host = ModelLedger(dtype=torch.bfloat16, device=torch.device(text_encoder_device),
                           checkpoint_path=files.checkpoint, gemma_root_path=gemma)
        text_encoder = CheckpointTextEncoder(host.text_encoder(), host.gemma_embeddings_processor())
    else:
        text_encoder = CheckpointTextEncoder(ledger.text_encoder(), ledger.gemma_embeddings_processor())
    vae = meta.get("vae", {})
    audio_vae = meta.get("audio_vae", {})
    ddconfig = audio_vae.get("model", {}).get("params", {}).get("ddconfig", {})
    audio_channels = int(ddconfig.get("z_channels", 8))
    # latent frequency bins: the audio VAE halves the mel axis at each level after the first
    mel_bins = int(ddconfig.get("mel_bins", 64)) // 2 ** (len(ddconfig.get("ch_mult", (1, 2, 4))) - 1)
    lora = (LoraWeights.from_file(files.distilled_lora, files.distilled_lora_strength)
            if files.distilled_lora else None)
    # an fp8 checkpoint loads as stored; `quantization` (--quantization) converts a bf16 one while loading
    # resident_blocks (--resident-blocks / the planner): the others stream from host memory or the file
    transformer = build_transformer(cfg, ctx, device=device, dtype=dtype, files=[files.checkpoint],
                                    quantization=quantization, resident_blocks=resident_blocks, source=source)
    return LTX2Components(
        transformer=transformer, video_encoder=ledger.video_encoder(), video_decoder=ledger.video_decoder(),
        upsampler=ledger.spatial_upsampler(), audio_decoder=ledger.audio_decoder(), vocoder=ledger.vocoder(),
        text_encoder=text_encoder, video_latent_channels=int(vae.get("latent_channels", 128)),
        audio_latent_channels=audio_channels, audio_mel_bins=mel_bins, device=device, dtype=dtype,
        name=Path(files.checkpoint).stem, stage2_lora=lora, checkpoint_path=files.checkpoint)


def build_components(model: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     ctx: ParallelContext = SINGLE, seed: int = 0, spatial_upsampler_path: str | None = None,
                     text_encoder_path: str | None = None, distilled_lora_path: str | None = None,
                     distilled_lora_strength: float = 1.0, quantization: str | None = None,
                     resident_blocks: int | None = None) -> LTX2Components:
    """`tiny` (embedded, tiny.py) or a path to the official checkpoint files; `resident_blocks` K:
    the first K DiT blocks on the device, the others streamed from host memory (memory/swap.py)."""
    if model == "tiny":
        comps = build_tiny_components(seed, device=device, dtype=dtype, ctx=ctx)
        if quantization:
            from ltx2_tp.models.ltx2.quantization import quantize_model

            quantize_model(comps.transformer, quantization)
        if resident_blocks is not None:  # after quantizing: what streams is what runs
            from ltx2_tp.memory.swap import enable_block_swap

            enable_block_swap(comps.transformer, resident_blocks, "host", device=comps.device)
        return comps
    files = CheckpointFiles.discover(model, spatial_upsampler_path, text_encoder_path, distilled_lora_path,
                                     distilled_lora_strength)
    return build_checkpoint_components(files, device=device, dtype=dtype, ctx=ctx, quantization=quantization,
                                       resident_blocks=resident_blocks)
