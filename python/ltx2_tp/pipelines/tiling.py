"""Temporal tiles of a long video: where each tile starts and ends, in latent frames, pixel frames,
audio latent frames and audio samples, and which prompt it takes. Pure arithmetic.

The units are ComfyUI LTXVLoopingSampler's: `tile_frames` and `tile_overlap_frames` are multiples
of 8 and count latent frames x 8 (its default 80 / 24 = 10 / 3 latent frames). Consecutive tiles
share `overlap` latent frames, so each tile adds exactly tile_frames - overlap_frames frames
(80 / 24: 56). A tile of L latent frames decodes to 8(L-1)+1 frames (80 -> 73: LTX's 8k+1 rule);
its latent 0 decodes to one frame (the VAE is causal in time) and latent j >= 1 to the 8 frames
8j-7..8j. Tile k+1's latent 0 is tile k's latent L-O, so tile k+1's frame p is the video's frame
8 * start + p, and two tiles share 8(O-1)+1 decoded frames (24 -> 17): these are cross-faded.

Audio has 25 latent frames per second (ltx-core's AudioLatentShape) and the same causal layout (a
tile's audio latent 0 decodes to one mel frame, later latents to 4): a tile's audio covers the
video's audio latents [round(25 * first frame / fps), round(25 * (first frame + frames) / fps)),
so the last tile ends where a one-piece generation of the whole video ends, and the decoded
waveforms, placed at samples_per_latent * audio_start, tile the one-piece waveform's length.
"""

from __future__ import annotations

from dataclasses import dataclass

from ltx2_tp.latent_grid import TEMPORAL_SCALE, audio_latent_frames, latent_frames


@dataclass(frozen=True)
class Tile:
    index: int  # 0-based
    count: int
    latent_start: int  # first latent frame, counted in the whole video's latent frames
    latent_frames: int
    overlap: int  # latent frames shared with the previous tile (0 for the first)
    audio_start: int  # first audio latent frame of the whole video's
    audio_frames: int
    audio_overlap: int  # audio latent frames shared with the previous tile
    next_overlap: int = 0  # latent frames the next tile takes from this one (0 for the last)
    next_audio_overlap: int = 0

    @property
    def frame_start(self) -> int:
        """The video frame this tile's frame 0 is."""
        return TEMPORAL_SCALE * self.latent_start

    @property
    def frames(self) -> int:
        return TEMPORAL_SCALE * (self.latent_frames - 1) + 1

    @property
    def overlap_frames(self) -> int:
        """Decoded frames shared with the previous tile (cross-faded)."""
        return TEMPORAL_SCALE * (self.overlap - 1) + 1 if self.overlap else 0

    @property
    def first_new_frame(self) -> int:
        """The first video frame no earlier tile has."""
        return self.frame_start + self.overlap_frames

    @property
    def next_frame_start(self) -> int | None:
        return None if not self.next_overlap else TEMPORAL_SCALE * (self.latent_start + self.latent_frames - self.next_overlap)

    @property
    def label(self) -> str:
        return f"tile {self.index + 1}/{self.count}"


def plan_tiles(num_frames: int, fps: float, tile_frames: int, overlap_frames: int) -> list[Tile]:
    """The tiles of a `num_frames`-frame video (8k+1). Every tile but the last has tile_frames / 8
    latent frames; the last may be shorter, but always adds new frames (more than the overlap)."""
    total = latent_frames(num_frames)
    size, overlap = tile_frames // TEMPORAL_SCALE, overlap_frames // TEMPORAL_SCALE
    if not 0 < overlap < size:
        raise ValueError(f"overlap ({overlap_frames} frames) must be below the tile ({tile_frames} frames)")
    starts = [0]
    while starts[-1] + size < total:
        starts.append(starts[-1] + size - overlap)
    spans = [(s, min(size, total - s)) for s in starts]
    audio = [(audio_latent_frames(TEMPORAL_SCALE * s, fps),
              audio_latent_frames(TEMPORAL_SCALE * s + TEMPORAL_SCALE * (n - 1) + 1, fps)) for s, n in spans]
    tiles = []
    for i, ((s, n), (a0, a1)) in enumerate(zip(spans, audio)):
        last = i == len(spans) - 1
        tiles.append(Tile(index=i, count=len(spans), latent_start=s, latent_frames=n, overlap=overlap if i else 0,
                          audio_start=a0, audio_frames=a1 - a0, audio_overlap=audio[i - 1][1] - a0 if i else 0,
                          next_overlap=0 if last else overlap,
                          next_audio_overlap=0 if last else a1 - audio[i + 1][0]))
    return tiles


def surely_tiled(req) -> bool:
    """Tiled whatever memory says: long_video_mode tiled, or auto past one piece's frame limit or
    with per-tile prompts (LTX2LongVideo.choose_mode's sure cases)."""
    from ltx2_tp.pipelines.request import MAX_FRAMES

    mode = getattr(req, "long_video_mode", "dense")
    return mode == "tiled" or (mode == "auto" and (req.num_frames > MAX_FRAMES or bool(req.prompts)
                                                   or bool(req.prompt_schedule)))


def memory_frames(req) -> int:
    """The frames a request holds in memory at once: its first tile's when it is surely tiled, else
    all of them (auto's other choices come later; a dense request that does not fit is refused by
    the memory checks before it runs)."""
    if not surely_tiled(req):
        return req.num_frames
    return plan_tiles(req.num_frames, req.fps, req.tile_frames, req.tile_overlap_frames)[0].frames


def tile_prompt(req, tile: Tile) -> str:
    """The prompt tile `tile` generates with: the schedule's entry in force at its first new frame,
    else prompts[index] (the last one for later tiles), else the request's prompt."""
    if req.prompt_schedule:
        t = tile.first_new_frame / float(req.fps)
        chosen = req.prompt
        for start, text in req.prompt_schedule:
            if start <= t:
                chosen = text
        return chosen
    if req.prompts:
        return req.prompts[min(tile.index, len(req.prompts) - 1)]
    return req.prompt
