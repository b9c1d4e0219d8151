"""Decode + write: the whole last stage of a request, today's path against ours, and its parts.

Components: ltx-core's video VAE decoder, audio VAE decoder and vocoder at the released LTX-2
configs (bench_request.py's REAL_*), random weights, bf16 on CUDA; `--model tiny` = the tiny
components, `--model narrow` = the released VAE's structure with 32 base channels (CPU evidence).
A tensor of --reserve-gib stands in for the resident DiT weights (36 GiB), so the memory plans see
the free memory a request sees. Random weights decode to noise, x264's worst case (10x slower than
video): the whole stage is also run with the VAE's output replaced, after it is computed, by
ffmpeg's testsrc2 ("content testsrc2": the VAE's cost, a real video's encode).

One GPU call (~2-3 min on an H100) measures, per size (default 768x512x121, 1920x1088x121,
1920x1088x961):
- VAE alone: ltx-core's whole-video decode, our streamed decode (vae_stream.py) in pieces of
  8 / 16 / 32 frames, ltx-core's temporal tiles (32 frames: what chunking by tiles costs), with
  peak memory and the allocator's retries (cudaMalloc failed -> cache flushed -> retried);
- at 961 frames, ltx-core's tiles as LTX2LongVideo planned them (first 3 tiles, each timed) and
  a whole decode of one tile's shape: what made 961 frames cost 4.5x per frame;
- x264 settings on the VAE's output, testsrc2 and mandelbrot (ms / frame, MB, PSNR);
- the whole stage: today's (ltx-core decode + ltx-pipelines encode_video), ours exact
  (--decode-mode exact) and ours fast (the default), with its parts.
The table comes last; --out writes everything as JSON.

    python benchmark/bench_decode.py --out benchmark/results/bench_decode_h100_<date>.json
    python benchmark/bench_decode.py --device cpu --model narrow --sizes 128x128x121,128x128x961 --vae-only --tile 112
    python benchmark/bench_decode.py --device cpu --model tiny --sizes 128x128x17 --repeat 1   # smoke test
    python benchmark/bench_decode.py --encode-only --sizes 768x512x121 --device cpu             # x264 options alone
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ltx2_tp.compat import ensure_ltx_imports  # noqa: E402

ensure_ltx_imports()

from common import write_json  # noqa: E402

from ltx2_tp.media import write_media  # noqa: E402
from ltx2_tp.media_stream import EXACT_OPTIONS, FAST_OPTIONS, EncoderOptions, StreamingMP4Writer  # noqa: E402
from ltx2_tp.models.vae_stream import Streamed  # noqa: E402
from ltx2_tp.pipelines import decode, stages  # noqa: E402

# x264 settings compared (name -> options)
ENCODERS = {
    "today: medium, slice threads, swscale": EXACT_OPTIONS,
    "FAST (default): ultrafast, frame threads, gpu I420": FAST_OPTIONS,
    "superfast, frame threads, gpu I420": EncoderOptions(preset="superfast", frame_threads=True, convert="gpu"),
    "veryfast, frame threads, gpu I420": EncoderOptions(preset="veryfast", frame_threads=True, convert="gpu"),
    "ultrafast, frame threads, swscale": EncoderOptions(preset="ultrafast", frame_threads=True),
}
TODAY, FAST = "today: medium, slice threads, swscale", "FAST (default): ultrafast, frame threads, gpu I420"


def build(model: str, device, dtype):
    from ltx_core.model.audio_vae import AudioDecoderConfigurator, VocoderConfigurator
    from ltx_core.model.video_vae import VideoDecoderConfigurator

    from ltx2_tp.pipelines.tiny import TINY_AUDIO_VAE, TINY_VAE, TINY_VOCODER, neutral_latent_statistics

    if model == "tiny":
        cfg, channels, audio_channels = (TINY_VAE, TINY_AUDIO_VAE, TINY_VOCODER), 16, 1
    else:
        from bench_request import REAL_AUDIO_VAE, REAL_VAE, REAL_VOCODER

        vae = REAL_VAE
        if model == "narrow":  # the released structure, 1/4 of the channels: CPU-sized
            vae = copy.deepcopy(REAL_VAE)
            vae["vae"]["decoder_base_channels"] = 32
        cfg, channels, audio_channels = (vae, REAL_AUDIO_VAE, REAL_VOCODER), 128, 8
    torch.manual_seed(0)
    with torch.device(device):
        parts = dict(video_decoder=VideoDecoderConfigurator.from_config(cfg[0]),
                     audio_decoder=AudioDecoderConfigurator.from_config(cfg[1]),
                     vocoder=VocoderConfigurator.from_config(cfg[2]))
    parts = {k: m.to(dtype=dtype).eval() for k, m in parts.items()}
    neutral_latent_statistics(parts.values())
    return SimpleNamespace(**parts, channels=channels, audio_channels=audio_channels, device=torch.device(device))


def make_latents(c, frames, height, width, seed=0):
    from ltx_core.types import AudioLatentShape, VideoPixelShape

    g = torch.Generator(device=c.device).manual_seed(seed)
    dtype = next(c.video_decoder.parameters()).dtype
    video = torch.randn(1, c.channels, (frames - 1) // 8 + 1, height // 32, width // 32, generator=g, device=c.device,
                        dtype=dtype)
    a = AudioLatentShape.from_video_pixel_shape(VideoPixelShape(batch=1, frames=frames, width=width, height=height,
                                                                fps=24.0), channels=c.audio_channels, mel_bins=16)
    audio = torch.randn(a.batch, a.channels, a.frames, a.mel_bins, generator=g, device=c.device, dtype=dtype)
    return video, audio


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(cpu: bool):
    """Wall time on CUDA (synchronized); process CPU time on the CPU, which a shared machine's
    load disturbs less (torch at one thread)."""
    return time.process_time if cpu else time.perf_counter


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


class Memory:
    """Peak allocated / reserved GiB and the caching allocator's retries over a block (CUDA only)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.peak = self.reserved = 0.0
        self.retries = 0

    def __enter__(self):
        if self.cuda:
            sync()
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()
            self.retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            sync()
            st = torch.cuda.memory_stats()
            self.peak = (st.get("allocated_bytes.all.peak", 0) - self.base) / 2**30
            self.reserved = st.get("reserved_bytes.all.peak", 0) / 2**30
            self.retries = st.get("num_alloc_retries", 0) - self.retries0
        return False

    def note(self) -> str:
        return f"peak {self.peak:.1f} GiB, reserved {self.reserved:.1f}, alloc retries {self.retries}" if self.cuda else ""


def source(name, n, height, width):
    """ffmpeg's testsrc2 / mandelbrot pattern, RGB, (n, h, w, 3) uint8."""
    import av

    g = av.filter.Graph()
    src = g.add(name, f"size={width}x{height}:rate=24")
    fmt = g.add("format", "pix_fmts=rgb24")
    sink = g.add("buffersink")
    src.link_to(fmt)
    fmt.link_to(sink)
    g.configure()
    return np.stack([sink.pull().to_ndarray() for _ in range(n)])


def read_frames(path):
    import av

    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])


def yuv420_roundtrip(frames):
    """The source through swscale's RGB -> 4:2:0 -> RGB: what a lossless 4:2:0 encoder returns."""
    import av

    return np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray(format="rgb24")
                     for f in frames])


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse > 0 else float("inf")


def encode(frames_host, opts, path, device):
    """Video only through StreamingMP4Writer, from device frames as decode.py hands them over."""
    h, w = frames_host.shape[1:3]
    dev = torch.from_numpy(frames_host).to(device)
    with StreamingMP4Writer(path, w, h, 24, options=opts) as wr:
        sync()
        t0 = time.perf_counter()
        for host, ready in decode.host_chunks(dev, opts.convert):
            wr.put(host, ready)
        wr.finish()
    return time.perf_counter() - t0


# ---- parts ---------------------------------------------------------------------------------------

def vae_variants(c, video, frames, variants, repeat, log, cpu=False) -> dict:
    """The video VAE alone (uint8 frames on the device, none kept): {name: {s, ms_per_frame, ...}}."""
    out = {}
    for name, tile in variants:
        runs = []
        for _ in range(repeat):
            with Memory(c.device) as mem:
                tick = clock(cpu)
                sync()
                t0, pieces = tick(), 0
                for _chunk in stages.decode_video(c, video, tile)[0]:
                    pieces += 1
                sync()
                runs.append(tick() - t0)
        out[name] = v = {"s": min(runs), "ms_per_frame": 1e3 * min(runs) / frames, "pieces": pieces,
                         "peak_gib": mem.peak, "reserved_gib": mem.reserved, "alloc_retries": mem.retries}
        log(f"  VAE {name:34s} {v['s']:7.3f} s {v['ms_per_frame']:6.2f} ms/frame  {pieces:3d} pieces  {mem.note()}")
    return out


def tiles_diagnosis(c, video, tile, log, first=3) -> dict:
    """ltx-core's temporal tiles as planned, the first `first` chunks timed one by one (a chunk comes
    out after the next tile is decoded), then the whole decode of one tile's latent shape."""
    lat_tile = tile // 8 + 1  # ltx-core's later tiles: tile/8 latents + 1 (the causal shift)
    r = {"tile_frames": tile, "chunks_s": []}
    with Memory(c.device) as mem:
        frames = stages.decode_video(c, video, tile)[0]
        for _ in range(first):
            t, chunk = timed(lambda: next(frames, None))
            if chunk is None:
                break
            r["chunks_s"].append(t)
        del frames
    r.update(peak_gib=mem.peak, reserved_gib=mem.reserved, alloc_retries=mem.retries)
    log(f"  ltx-core tiles of {tile}: first chunks " + ", ".join(f"{t:.2f}" for t in r["chunks_s"]) +
        f" s  {mem.note()}")
    one = video[:, :, :lat_tile].contiguous()
    with Memory(c.device) as mem:
        timed(lambda: [None for _ in stages.decode_video(c, one, None)[0]])
        t, _ = timed(lambda: [None for _ in stages.decode_video(c, one, None)[0]])
    r["one_tile_whole_s"], r["one_tile_frames"] = t, (lat_tile - 1) * 8 + 1
    r.update(one_tile_peak_gib=mem.peak, one_tile_alloc_retries=mem.retries)
    log(f"  one tile's shape ({lat_tile} latents, {r['one_tile_frames']} frames) decoded whole: {t:.2f} s  {mem.note()}")
    return r


def encoders(r, contents, tmp: Path, device, log, labels) -> None:
    for content, src in contents.items():
        ref, src420 = None, yuv420_roundtrip(src)
        for label in labels:
            path = tmp / "enc.mp4"
            t = encode(src, ENCODERS[label], path, device)
            back = read_frames(path)
            ref = back if ref is None else ref
            r["encoders"][f"{content} | {label}"] = v = {
                "s": t, "ms_per_frame": 1e3 * t / len(src), "mb": path.stat().st_size / 1e6,
                "psnr_vs_source_420_db": psnr(back, src420), "psnr_vs_today_db": psnr(back, ref)}
            log(f"  encode {content:10s} {label:50s} {v['ms_per_frame']:6.2f} ms/frame {v['mb']:6.2f} MB  PSNR "
                f"{v['psnr_vs_source_420_db']:5.2f} dB vs the source's 4:2:0, {v['psnr_vs_today_db']:6.2f} vs today")


@contextlib.contextmanager
def content(src):
    """The VAE's frames replaced, once computed, by `src` ((n, h, w, 3) uint8 on the device,
    repeated): the VAE's cost with a real video's encode. None: the VAE's own frames."""
    if src is None:
        yield
        return
    real = stages.decode_video

    def replaced(*a, **k):
        frames, n = real(*a, **k)

        def gen():
            i = 0
            for chunk in frames:
                idx = torch.arange(i, i + chunk.shape[0], device=src.device) % src.shape[0]
                i += chunk.shape[0]
                yield src[idx]
        return gen(), n

    stages.decode_video = replaced
    try:
        yield
    finally:
        stages.decode_video = real


def whole_runs(c, video, audio_lat, runs, repeat, tmp, log) -> dict:
    """runs: (label, tile_frames, options, content frames or None). Best of `repeat`, with parts."""
    out = {}
    for label, tile, opts, src in runs:
        best = None
        for _ in range(repeat):
            timer = stages.StageTimer()
            with Memory(c.device) as mem, content(src), timer("decode_and_write"):
                t = timed(lambda: decode.decode_and_write(c, video, audio_lat, 24.0, tmp / "new.mp4", "mp4", None,
                                                          tile, opts, timer))[0]
            if best is None or t < best[0]:
                best = (t, {k.split(".", 1)[1]: v for k, v in timer.parts.items()}, mem.peak, mem.retries)
        t, parts, peak, retries = best
        out[label] = {"s": t, "parts": parts, "peak_gib": peak, "alloc_retries": retries}
        log(f"  whole, {label}: {t:.3f} s  " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()) +
            (f"  peak {peak:.1f} GiB, retries {retries}" if c.device.type == "cuda" else ""))
    return out


def bench_size(c, size, a, tmp: Path, log, first: bool) -> dict:
    width, height, frames = size
    name = f"{width}x{height}x{frames}"
    cuda = c.device.type == "cuda"
    long = frames > 121
    r = {"size": name, "vae": {}, "encoders": {}, "whole": {}, "parts": {}}
    video, audio_lat = make_latents(c, frames, height, width)
    dec = c.video_decoder
    dtype = next(dec.parameters()).dtype
    free = decode.free_bytes(c.device)
    tile = decode.plan_temporal_tile(dec, video.shape, dtype, free) if a.tile == "auto" else (
        None if a.tile == "none" else int(a.tile))
    chunk = decode.plan_stream_chunk(dec, video.shape, dtype, free)
    r.update(tile_frames=tile, stream_chunk_frames=chunk, free_gib=free / 2**30)
    log(f"[{name}] free {free / 2**30:.1f} GiB: ltx-core tiles {tile}, streamed pieces of {chunk}")

    # 1. the video VAE alone
    variants = [(f"streamed, pieces of {chunk}", Streamed(chunk))]
    if a.vae_only:
        variants += [(f"ltx-core tiles of {tile}", tile)] if tile else []
        variants += [] if long and tile else [("ltx-core whole video", None)]
    elif not long:
        variants = [("ltx-core whole video", None)] + variants
        if first:
            variants += [("streamed, pieces of 8", Streamed(8)), ("streamed, pieces of 32", Streamed(32)),
                         ("ltx-core tiles of 32 (overlap 8)", 32)]
    repeat = 1 if long or a.vae_only and not cuda else 2
    if not long or a.vae_only:
        r["vae"] = vae_variants(c, video, frames, variants, repeat, log, cpu=not cuda)
    if a.vae_only:
        return r
    if long and tile and cuda:
        r["tiles_diagnosis"] = tiles_diagnosis(c, video, tile, log)

    # 2. audio alone
    if not long:
        timed(lambda: stages.decode_audio(c, audio_lat))
        r["parts"]["audio VAE + vocoder"] = t = timed(lambda: stages.decode_audio(c, audio_lat))[0]
        log(f"  audio VAE + vocoder {t:.3f} s")

    # 3. x264 settings on the VAE's frames, testsrc2 and mandelbrot (first size)
    n_src = frames if not long else 48
    testsrc = source("testsrc2", min(frames, n_src), height, width)
    if first:
        host = torch.cat(list(stages.decode_video(c, video, None)[0])).cpu().numpy()
        labels = [k for k in ENCODERS if cuda or ENCODERS[k].convert == "cpu" or k == FAST]
        encoders(r, {"VAE output": host, "testsrc2": testsrc, "mandelbrot": source("mandelbrot", frames, height, width)},
                 tmp, c.device, log, labels)
        del host

    # 4. the whole stage
    src = torch.from_numpy(testsrc).to(c.device)
    runs = [("ours fast (default)", decode.STREAM, FAST_OPTIONS, None),
            ("ours fast (default), content testsrc2", decode.STREAM, FAST_OPTIONS, src)]
    if not long:
        runs.append(("ours exact (--decode-mode exact)", tile if long else None, EXACT_OPTIONS, None))
    if first:
        whole_runs(c, video, audio_lat, runs[:1], 1, tmp, lambda *_: None)  # warm-up: pinned buffers, x264
    r["whole"].update(whole_runs(c, video, audio_lat, runs, a.repeat if first else 1, tmp, log))  # GPU budget
    if first or a.old_path_long:
        def old():
            fr, n = stages.decode_video(c, video, tile if long else None, None)
            au = stages.decode_audio(c, audio_lat)
            write_media(fr, n, 24.0, au, tmp / "old.mp4", "mp4")
        r["whole"]["today: ltx-core decode + ltx-pipelines encode_video"] = {"s": timed(old)[0]}
        log(f"  whole, today {r['whole']['today: ltx-core decode + ltx-pipelines encode_video']['s']:.3f} s")
    return r


def bench_encode_only(size, tmp: Path, log) -> dict:
    width, height, frames = size
    r = {"size": f"{width}x{height}x{frames}", "vae": {}, "encoders": {}, "whole": {}, "parts": {}}
    noise = np.random.default_rng(0).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    encoders(r, {"noise": noise, "testsrc2": source("testsrc2", frames, height, width),
                 "mandelbrot": source("mandelbrot", frames, height, width)}, tmp, torch.device("cpu"), log, list(ENCODERS))
    return r


def table(results, device_name, total) -> None:
    print(f"\n{device_name}; bench took {total:.0f} s")
    print("| size | what | seconds | ms/frame | note |\n|---|---|---|---|---|")
    for r in results:
        size, frames = r["size"], int(r["size"].split("x")[2])
        for k, v in r["vae"].items():
            note = f"{v['pieces']} pieces; peak {v['peak_gib']:.1f} GiB, alloc retries {v['alloc_retries']}"
            print(f"| {size} | VAE {k} | {v['s']:.3f} | {v['ms_per_frame']:.2f} | {note} |")
        d = r.get("tiles_diagnosis")
        if d:
            print(f"| {size} | ltx-core tiles of {d['tile_frames']}, first chunks | "
                  f"{' / '.join(f'{t:.2f}' for t in d['chunks_s'])} | | peak {d['peak_gib']:.1f} GiB, reserved "
                  f"{d['reserved_gib']:.1f}, alloc retries {d['alloc_retries']} |")
            print(f"| {size} | one tile's shape decoded whole ({d['one_tile_frames']} frames) | {d['one_tile_whole_s']:.3f} | "
                  f"{1e3 * d['one_tile_whole_s'] / d['one_tile_frames']:.2f} | alloc retries {d['one_tile_alloc_retries']} |")
        for k, v in r["parts"].items():
            print(f"| {size} | {k} | {v:.3f} | | |")
        for k, v in r["whole"].items():
            p = v.get("parts", {})
            note = ", ".join(f"{n} {p[n]:.3f}" for n in ("video_decode", "audio_decode", "encode_thread_busy",
                                                          "first_frames_at_encoder", "write_after_decode",
                                                          "tail_backlog_encode", "tail_flush_audio_close") if n in p)
            print(f"| {size} | WHOLE {k} | {v['s']:.3f} | {1e3 * v['s'] / frames:.2f} | {note} |")
    enc = [(r["size"], k, v) for r in results for k, v in r["encoders"].items()]
    if enc:
        print("\n| size | content / x264 settings | ms/frame | MB | PSNR dB vs the source's 4:2:0 | vs today's file |"
              "\n|---|---|---|---|---|---|")
        for size, k, v in enc:
            print(f"| {size} | {k} | {v['ms_per_frame']:.2f} | {v['mb']:.2f} | {v['psnr_vs_source_420_db']:.2f} | "
                  f"{v['psnr_vs_today_db']:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="real (default on CUDA), narrow, or tiny (default on CPU)")
    p.add_argument("--sizes", default="768x512x121,1920x1088x121,1920x1088x961", help="WxHxF,...")
    p.add_argument("--skip-961", action="store_true", help="leave out sizes above 121 frames")
    p.add_argument("--tile", default="auto", help="ltx-core tiles: auto (memory plan), none, or frames per tile")
    p.add_argument("--reserve-gib", type=float, default=None, help="GPU memory held as the DiT's (default 36 on CUDA)")
    p.add_argument("--repeat", type=int, default=2, help="whole-stage runs (best of) at the first size; 1 after it")
    p.add_argument("--old-path-long", action="store_true", help="also today's path after the first size (minutes)")
    p.add_argument("--vae-only", action="store_true", help="only the video VAE: streamed, ltx-core tiles, whole")
    p.add_argument("--encode-only", action="store_true", help="x264 options only, on noise, testsrc2, mandelbrot")
    p.add_argument("--out", default=None, help="JSON file")
    a = p.parse_args()
    model = a.model or ("real" if a.device == "cuda" else "tiny")
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    if a.device == "cpu" and a.vae_only:
        torch.set_num_threads(1)  # process time = compute, whatever else runs on the machine
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    if a.skip_961:
        sizes = [s for s in sizes if s[2] <= 121]
    t_start = time.perf_counter()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    c = None if a.encode_only else build(model, a.device, dtype)
    reserve = None
    if a.device == "cuda":
        gib = 36.0 if a.reserve_gib is None else a.reserve_gib
        reserve = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=a.device)
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    log(f"{device_name}, {os.cpu_count()} CPU cores, model {model}, {dtype}, reserved "
        f"{0 if reserve is None else reserve.numel() / 2**30:.0f} GiB")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            if a.encode_only:
                results.append(bench_encode_only(size, Path(tmp), log))
            else:
                results.append(bench_size(c, size, a, Path(tmp), log, first=size == sizes[0]))
    total = time.perf_counter() - t_start
    table(results, device_name, total)
    if a.out:
        write_json(a.out, {"date": datetime.date.today().isoformat(), "device": device_name, "cpu_cores": os.cpu_count(),
                           "command": " ".join(sys.argv), "model": model, "dtype": str(dtype), "results": results,
                           "log": lines, "seconds": total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
