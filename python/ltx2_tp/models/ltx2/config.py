"""LTX-2 transformer configuration and named presets.

Field names follow ltx-core's `LTXModel.__init__` and the checkpoint's embedded
`config["transformer"]` JSON, so a checkpoint's metadata maps onto this dataclass directly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class LTX2Config:
    # video stream (None of these matter when has_video is False)
    has_video: bool = True
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    in_channels: int = 128
    out_channels: int = 128
    cross_attention_dim: int = 4096
    positional_embedding_max_pos: tuple[int, ...] = (20, 2048, 2048)
    # audio stream
    has_audio: bool = True
    audio_num_attention_heads: int = 32
    audio_attention_head_dim: int = 64
    audio_in_channels: int = 128
    audio_out_channels: int = 128
    audio_cross_attention_dim: int = 2048
    audio_positional_embedding_max_pos: tuple[int, ...] = (20,)
    # shared
    num_layers: int = 48
    norm_eps: float = 1e-6
    positional_embedding_theta: float = 10000.0
    timestep_scale_multiplier: int = 1000
    av_ca_timestep_scale_multiplier: float = 1.0
    use_middle_indices_grid: bool = True
    rope_type: str = "interleaved"  # "interleaved" | "split"
    double_precision_rope: bool = False  # checkpoint: frequencies_precision == "float64"
    apply_gated_attention: bool = False
    cross_attention_adaln: bool = False
    # Caption projection (3840 -> D) inside the transformer (19B) or in the text encoder (2.3).
    caption_projection: bool = True
    caption_channels: int = 3840
    ff_mult: int = 4
    ff_bias: bool = True  # LTX-2.5: video FFN without bias
    audio_ff_bias: bool = True

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def audio_inner_dim(self) -> int:
        return self.audio_num_attention_heads * self.audio_attention_head_dim

    @property
    def adaln_coefficient(self) -> int:
        # 6 = (shift, scale, gate) x (attention, FFN); cross-attention AdaLN adds 3.
        return 9 if self.cross_attention_adaln else 6

    @property
    def cross_pe_max_pos(self) -> int:
        return max(self.positional_embedding_max_pos[0], self.audio_positional_embedding_max_pos[0])

    def replace(self, **kw) -> "LTX2Config":
        return dataclasses.replace(self, **kw)

    def validate(self) -> None:
        """Refuse a configuration the DiT cannot run, naming the field (LTX2Model calls this).

        Every configuration ltx-core 1.0.0's LTXModel runs is accepted (test_parity_ltx_core.py
        covers odd head sizes); each one refused here fails inside ltx-core's forward too, with a
        shape error from a matmul or reshape."""
        if not (self.has_video or self.has_audio):
            raise ValueError("has_video and has_audio are both False: the model needs at least one stream")
        if self.rope_type not in ("interleaved", "split"):
            raise ValueError(f"rope_type must be 'interleaved' or 'split', got {self.rope_type!r}")
        for p, heads, head_dim, inner in self._streams():
            if self.rope_type == "interleaved" and inner % 2:  # RoPE rotates channel pairs
                raise ValueError(f"{p}num_attention_heads x {p}attention_head_dim = {inner} must be even "
                                 "(interleaved RoPE rotates channel pairs)")
            if self.rope_type == "split" and head_dim % 2:  # split RoPE rotates the halves of each head
                raise ValueError(f"{p}attention_head_dim={head_dim} must be even with rope_type='split'")
        if self.has_video and self.has_audio and self.rope_type == "split" \
                and self.audio_inner_dim % (2 * self.num_attention_heads):
            # a<->v attention rotates audio-width queries and keys in video-head groups on the video side
            raise ValueError(f"audio_num_attention_heads x audio_attention_head_dim = {self.audio_inner_dim} must be "
                             f"a multiple of 2 x num_attention_heads = {2 * self.num_attention_heads} with "
                             "rope_type='split' (the a<->v RoPE splits it into video-head groups)")

    def validate_parallel(self, tp_size: int, ulysses_size: int = 1) -> None:
        """`validate`, then refuse layouts whose degrees do not divide the head counts, or that would
        cut an interleaved RoPE pair between TP ranks (named in the error)."""
        self.validate()
        for p, heads, _, inner in self._streams():
            name = f"{p}num_attention_heads"
            if heads % tp_size:
                raise ValueError(
                    f"tp_size={tp_size} must divide {name}={heads}; allowed tp_size values: "
                    f"{_divisors(heads)}"
                )
            if self.rope_type == "interleaved" and (inner // tp_size) % 2:
                ok = [d for d in _divisors(heads) if (inner // d) % 2 == 0]
                raise ValueError(
                    f"tp_size={tp_size} leaves each rank {inner // tp_size} channels of {name} x "
                    f"{p}attention_head_dim = {inner}, cutting an interleaved RoPE pair; allowed tp_size values: {ok}"
                )
            if (heads // tp_size) % ulysses_size:
                raise ValueError(
                    f"ulysses_size={ulysses_size} must divide {name}/tp_size={heads // tp_size}; "
                    f"allowed ulysses_size values: {_divisors(heads // tp_size)}"
                )

    def _streams(self):
        """(field prefix, heads, head dim, inner dim) of each stream the model has."""
        if self.has_video:
            yield "", self.num_attention_heads, self.attention_head_dim, self.inner_dim
        if self.has_audio:
            yield "audio_", self.audio_num_attention_heads, self.audio_attention_head_dim, self.audio_inner_dim

    # ---- checkpoint metadata -------------------------------------------------------------
    @classmethod
    def from_checkpoint_config(cls, config: dict | str, base: "LTX2Config | None" = None) -> "LTX2Config":
        """Build from the `config` JSON that official safetensors carry in their metadata."""
        if isinstance(config, str):
            config = json.loads(config)
        t = config.get("transformer", config)
        base = base or LTX2Config()
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in t.items() if k in names}
        for k in ("positional_embedding_max_pos", "audio_positional_embedding_max_pos"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if "frequencies_precision" in t:
            kw["double_precision_rope"] = t["frequencies_precision"] == "float64"
        if "caption_proj_before_connector" in t:
            kw["caption_projection"] = not t["caption_proj_before_connector"]
        return dataclasses.replace(base, **kw)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# Named presets. Facts from ../shared/ltx2.md and the checkpoints' embedded configs.
PRESETS: dict[str, LTX2Config] = {
    # LTX-2 19B audio-video: caption projection in the transformer.
    "ltx-2-19b": LTX2Config(
        rope_type="split", double_precision_rope=True, av_ca_timestep_scale_multiplier=1000.0
    ),
    # LTX-2.3 (22B): gated attention, cross-attention AdaLN, projection in the text encoder.
    "ltx-2.3": LTX2Config(
        rope_type="split",
        double_precision_rope=True,
        av_ca_timestep_scale_multiplier=1000.0,
        apply_gated_attention=True,
        cross_attention_adaln=True,
        caption_projection=False,
    ),
    # LTX-2.5: as 2.3 with the video FFN without bias (sglang's ltx_2_5 config).
    "ltx-2.5": LTX2Config(
        rope_type="split",
        double_precision_rope=True,
        av_ca_timestep_scale_multiplier=1000.0,
        apply_gated_attention=True,
        cross_attention_adaln=True,
        caption_projection=False,
        ff_bias=False,
    ),
    # Tiny: every feature of the real model at a size a CPU runs in milliseconds.
    # Video and audio share the head count so split-RoPE cross embeddings line up as in the real model.
    "tiny": LTX2Config(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=16,
        out_channels=16,
        cross_attention_dim=32,
        audio_num_attention_heads=4,
        audio_attention_head_dim=4,
        audio_in_channels=16,
        audio_out_channels=16,
        audio_cross_attention_dim=16,
        num_layers=2,
        caption_channels=24,
    ),
}


def get_config(name: str, **overrides) -> LTX2Config:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


__all__ = ["LTX2Config", "PRESETS", "get_config"]
