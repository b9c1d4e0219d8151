"""Decode + write, part by part: video VAE decode, audio VAE + vocoder, uint8 conversion + device ->
host copy, H.264 encoding (per x264 preset / threading / conversion, with PSNR against the source
frames), AAC encoding, muxing + file write; then the whole stage, today's path (ltx-core decode +
ltx-pipelines' encode_video) against pipelines/decode.py's overlapped one.

Components: ltx-core's video VAE decoder, audio VAE decoder and vocoder at the released LTX-2
configs (bench_request.py's REAL_*), random weights, bf16 on CUDA; `--model tiny` = the tiny
components (CPU). A tensor of --reserve-gib stands in for the resident DiT weights (35 GiB), so the
memory-planned tiling sees the free memory a request sees. Random weights decode to noise-like
frames, x264's worst case: encoding is also timed on ffmpeg's testsrc2 pattern (flat areas and
motion, closer to real video) for the same options.

    python benchmark/bench_decode.py --out benchmark/results/bench_decode_h100.json            # ~3 min
    python benchmark/bench_decode.py --skip-961 ...                                             # ~1 min
    python benchmark/bench_decode.py --device cpu --model tiny --sizes 128x128x17 --out /tmp/d.json
    python benchmark/bench_decode.py --encode-only --sizes 768x512x121 --device cpu     # x264 options alone
"""

from __future__ import annotations

import argparse
import datetime
import io
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
from ltx2_tp.media_stream import EncoderOptions, StreamingMP4Writer  # noqa: E402
from ltx2_tp.pipelines import decode, stages  # noqa: E402

# x264 settings compared (name -> options); "today" is what ltx-pipelines writes
ENCODERS = {
    "today (medium, slice threads)": EncoderOptions(),
    "medium, frame threads": EncoderOptions(frame_threads=True),
    "veryfast, frame threads": EncoderOptions(preset="veryfast", frame_threads=True),
    "superfast, frame threads": EncoderOptions(preset="superfast", frame_threads=True),
    "ultrafast, frame threads": EncoderOptions(preset="ultrafast", frame_threads=True),
    "veryfast, frame threads, gpu I420": EncoderOptions(preset="veryfast", frame_threads=True, convert="gpu"),
}
FAST = "veryfast, frame threads, gpu I420"


def build(model: str, device, dtype):
    from ltx_core.model.audio_vae import AudioDecoderConfigurator, VocoderConfigurator
    from ltx_core.model.video_vae import VideoDecoderConfigurator

    from ltx2_tp.pipelines.tiny import TINY_AUDIO_VAE, TINY_VAE, TINY_VOCODER, neutral_latent_statistics

    if model == "tiny":
        cfg, channels, audio_channels = (TINY_VAE, TINY_AUDIO_VAE, TINY_VOCODER), 16, 1
    else:
        from bench_request import REAL_AUDIO_VAE, REAL_VAE, REAL_VOCODER

        cfg, channels, audio_channels = (REAL_VAE, REAL_AUDIO_VAE, REAL_VOCODER), 128, 8
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


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def testsrc(n, height, width):
    """ffmpeg's testsrc2 pattern, RGB, (n, h, w, 3) uint8."""
    import av

    g = av.filter.Graph()
    src = g.add("testsrc2", f"size={width}x{height}:rate=24")
    fmt = g.add("format", "pix_fmts=rgb24")
    sink = g.add("buffersink")
    src.link_to(fmt)
    fmt.link_to(sink)
    g.configure()
    return np.stack([sink.pull().to_ndarray() for _ in range(n)])


def read_frames(path, every=1):
    import av

    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for i, fr in enumerate(f.decode(video=0)) if i % every == 0])


def yuv420_roundtrip(frames):
    """The source through swscale's RGB -> 4:2:0 -> RGB: what a lossless 4:2:0 encoder returns."""
    import av

    return np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray(format="rgb24")
                     for f in frames])


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse > 0 else float("inf")


def encode(frames_host, opts, path, device):
    """Video only through StreamingMP4Writer; gpu I420 conversion from device frames."""
    h, w = frames_host.shape[1:3]
    with StreamingMP4Writer(path, w, h, 24, options=opts) as wr:
        if opts.convert == "gpu":
            dev = torch.from_numpy(frames_host).to(device)
            sync()
            t0 = time.perf_counter()
            for host, ready in decode.host_chunks(dev, "gpu"):
                wr.put(host, ready)
        else:
            t0 = time.perf_counter()
            for i in range(0, len(frames_host), decode.FRAMES_PER_COPY):
                wr.put(frames_host[i:i + decode.FRAMES_PER_COPY])
        wr.finish()
    return time.perf_counter() - t0


def encoders(r, contents, a, tmp: Path, device, log, quick=False) -> None:
    for content, src in contents.items():
        frames = len(src)
        ref, src420 = None, yuv420_roundtrip(src)
        for label, opts in ENCODERS.items():
            if (quick and label not in ("today (medium, slice threads)", FAST)) or (
                    opts.convert == "gpu" and device.type != "cuda"):
                continue
            path = tmp / "enc.mp4"
            t = encode(src, opts, path, device)
            back = read_frames(path)
            ref = back if ref is None else ref
            r["encoders"][f"{content} | {label}"] = v = {
                "s": t, "ms_per_frame": 1e3 * t / frames, "mb": path.stat().st_size / 1e6,
                "psnr_vs_source_db": psnr(back, src), "psnr_vs_420_db": psnr(back, src420),
                "psnr_vs_today_db": psnr(back, ref)}
            log(f"  encode {content:10s} {label:36s} {v['ms_per_frame']:7.2f} ms/frame {v['mb']:6.1f} MB  PSNR "
                f"{v['psnr_vs_source_db']:5.2f} dB vs source, {v['psnr_vs_420_db']:5.2f} vs its 4:2:0, "
                f"{v['psnr_vs_today_db']:6.2f} vs today")


def bench_encode_only(size, a, tmp: Path, log) -> dict:
    """x264 options on uniform noise (the worst case, like random-weight VAE output) and testsrc2."""
    width, height, frames = size
    r = {"size": f"{width}x{height}x{frames}", "parts": {}, "encoders": {}, "whole": {}, "tile_frames": None}
    noise = np.random.default_rng(0).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    encoders(r, {"noise": noise, "testsrc2": testsrc(frames, height, width)}, a, tmp, torch.device(a.device), log,
             a.quick)
    from ltx_pipelines.utils.media_io import encode_video

    for content, src in (("noise", noise),):
        t0 = time.perf_counter()
        encode_video(iter([torch.from_numpy(src)]), 24, None, str(tmp / "serial.mp4"), 1)
        r["parts"][f"H.264 encode {content}, today (ltx-pipelines encode_video, serial)"] = time.perf_counter() - t0
    return r


def bench_size(c, size, a, tmp: Path, log, first: bool) -> dict:
    """Every part at `size`; all encoder settings and --repeat whole runs at the first size only."""
    from einops import rearrange
    from ltx_pipelines.utils.media_io import _prepare_audio_stream, _write_audio, encode_video

    width, height, frames = size
    name = f"{width}x{height}x{frames}"
    long = frames > 121
    r = {"size": name, "parts": {}, "encoders": {}, "whole": {}}
    video, audio_lat = make_latents(c, frames, height, width)
    dec = c.video_decoder
    dtype = next(dec.parameters()).dtype
    free = decode.free_bytes(c.device)
    tile = decode.plan_temporal_tile(dec, video.shape, dtype, free) if a.tile == "auto" else (
        None if a.tile == "none" else int(a.tile))
    r["tile_frames"], r["free_gib"] = tile, free / 2**30
    r["estimate_gib"] = decode.decoder_bytes(dec, tile or frames, height, width, dtype) / 2**30
    log(f"[{name}] free {free / 2**30:.1f} GiB, tile {tile}, decoder estimate {r['estimate_gib']:.1f} GiB")

    # 1. video VAE decode (ltx-core), float output, untiled up to 121 frames (the peak calibrates
    # decode.DECODER_PEAK_COPIES), in the planned tiles above
    def vae():
        with torch.no_grad():
            if not long:
                return [dec(video)]
            from ltx_core.model.video_vae import TemporalTilingConfig, TilingConfig

            cfg = TilingConfig(temporal_config=TemporalTilingConfig(tile, decode.TILE_OVERLAP))
            return sum(x.shape[2] for x in dec.tiled_decode(video, cfg))  # frames; none kept

    if c.device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    try:
        if not long:
            timed(vae)  # warm-up
        t, decoded = timed(vae)
    except torch.OutOfMemoryError:
        log("  untiled video VAE decode: out of memory")
        r["parts"]["video VAE decode (untiled)"] = float("nan")
        return r
    r["parts"]["video VAE decode" + (f" (tiles of {tile})" if long else " (untiled)")] = t
    if c.device.type == "cuda":
        r["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        est = decode.decoder_bytes(dec, tile if long else frames, height, width, dtype) / 2**30
        r["peak_over_estimate"] = r["peak_gib"] / est
        log(f"  video VAE decode {t:.3f} s, peak {r['peak_gib']:.2f} GiB = {r['peak_over_estimate']:.2f} x the "
            f"estimate ({decode.DECODER_PEAK_COPIES} copies)")

    if not long and c.device.type == "cuda":  # the same convs in channels-last layout: other cuDNN kernels
        try:
            dec.to(memory_format=torch.channels_last_3d)
            v_cl = video.contiguous(memory_format=torch.channels_last_3d)
            with torch.no_grad():
                timed(lambda: dec(v_cl))
                t_cl, out_cl = timed(lambda: dec(v_cl))
            to8 = lambda x: (((x + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).to(torch.uint8)  # noqa: E731
            r["parts"]["video VAE decode, channels_last_3d"] = t_cl
            r["channels_last_psnr_db"] = psnr(to8(out_cl).cpu().numpy(), to8(decoded[0]).cpu().numpy())
            log(f"  channels_last_3d decode {t_cl:.3f} s, frames PSNR {r['channels_last_psnr_db']:.1f} dB vs NCDHW")
            del out_cl, v_cl
        except Exception as e:  # noqa: BLE001 - a measurement only
            log(f"  channels_last_3d decode failed: {type(e).__name__}: {e}"[:200])
        finally:
            dec.to(memory_format=torch.contiguous_format)

    # 2. audio VAE + vocoder
    t, audio = timed(lambda: stages.decode_audio(c, audio_lat))
    t, audio = timed(lambda: stages.decode_audio(c, audio_lat))
    r["parts"]["audio VAE + vocoder"] = t
    audio = type(audio)(waveform=audio.waveform.cpu(), sampling_rate=audio.sampling_rate)

    if long:  # the rest of the parts at 121 frames' scale; here only the whole stage
        del decoded
    else:
        # 3. uint8 conversion (ltx-core's formula) and device -> host copy, today's and ours
        x = decoded[0]
        t, u8 = timed(lambda: rearrange((((x + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).to(torch.uint8)[0],
                                        "c f h w -> f h w c"))
        r["parts"]["uint8 conversion (device)"] = t
        r["parts"]["copy to host, today (pageable, strided)"] = timed(lambda: u8.to("cpu").numpy())[0]

        def ours():
            out = [(h, rd) for h, rd in decode.host_chunks(u8, "cpu")]
            for _, rd in out:
                if rd is not None:
                    rd()
            return out
        ours()  # warm-up: pinned blocks cached
        r["parts"]["copy to host, ours (pinned, 8-frame pieces)"] = timed(ours)[0]
        r["parts"]["I420 on device + copy"] = timed(lambda: [rd and rd() for _, rd in decode.host_chunks(u8, "gpu")])[0]
        host = u8.cpu().numpy()
        del decoded, x, u8

        # 4. H.264 encoding of the decoded frames and of testsrc2, per option set
        encoders(r, {"VAE output": host, "testsrc2": testsrc(frames, height, width)}, a, tmp, c.device, log,
                 quick=a.quick or not first)
        t0 = time.perf_counter()
        encode_video(iter([torch.from_numpy(host)]), 24, None, str(tmp / "serial.mp4"), 1)
        r["parts"]["H.264 encode, today (ltx-pipelines encode_video, serial)"] = time.perf_counter() - t0

        # 5. AAC alone; 6. muxing + file write alone (remux of the encoded packets)
        import av

        t0 = time.perf_counter()
        with av.open(str(tmp / "a.m4a"), "w", format="mp4") as cont:
            _write_audio(cont, _prepare_audio_stream(cont, audio.sampling_rate), audio)
        r["parts"]["AAC encode + mux"] = time.perf_counter() - t0
        buf = io.BytesIO((tmp / "serial.mp4").read_bytes())
        t0 = time.perf_counter()
        with av.open(buf) as src, av.open(str(tmp / "remux.mp4"), "w", format="mp4") as dst:
            s = dst.add_stream_from_template(src.streams.video[0])
            for pkt in src.demux(video=0):
                if pkt.dts is not None:
                    pkt.stream = s
                    dst.mux(pkt)
        r["parts"]["mux + file write (video packets)"] = time.perf_counter() - t0

    # 7. the whole stage: today's path and ours (best of --repeat up to 121 frames, once above)
    repeat = a.repeat if first else 1

    def best(fn):
        return min(timed(fn)[0] for _ in range(repeat))

    if not long or a.old_path_long:
        def old():
            fr, n = stages.decode_video(c, video, tile, None)
            au = stages.decode_audio(c, audio_lat)
            write_media(fr, n, 24.0, au, tmp / "old.mp4", "mp4")
        r["whole"]["today: ltx-core decode + ltx-pipelines encode_video"] = t = best(old)
        log(f"  whole, today {t:.3f} s")
    for label in ("today (medium, slice threads)", "veryfast, frame threads", FAST):
        if (long and label == "today (medium, slice threads)" and not a.old_path_long) or (
                ENCODERS[label].convert == "gpu" and c.device.type != "cuda"):
            continue
        runs = []
        for _ in range(repeat):
            timer = stages.StageTimer()
            with timer("decode_and_write"):
                t = timed(lambda: decode.decode_and_write(c, video, audio_lat, 24.0, tmp / "new.mp4", "mp4", None,
                                                          tile, ENCODERS[label], timer))[0]
            runs.append((t, {k.split(".", 1)[1]: v for k, v in timer.parts.items()}))
        t, parts = min(runs, key=lambda x: x[0])
        r["whole"][f"ours: {label}"] = t
        r["whole"][f"ours: {label} | parts"] = parts
        log(f"  whole, ours ({label}) {t:.3f} s  " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    return r


NVENC_PROBE = """
import io, av, numpy as np
if "h264_nvenc" not in av.codecs_available:
    print("h264_nvenc not in this PyAV build"); raise SystemExit
try:
    with av.open(io.BytesIO(), "w", format="mp4") as cont:
        s = cont.add_stream("h264_nvenc", rate=24)
        s.width, s.height, s.pix_fmt = 256, 256, "yuv420p"
        for pkt in s.encode(av.VideoFrame.from_ndarray(np.zeros((256, 256, 3), np.uint8), format="rgb24")):
            cont.mux(pkt)
    print("h264_nvenc opened and encoded a frame")
except Exception as e:
    print(f"h264_nvenc compiled in, but failed to open: {type(e).__name__}: {e}"[:300])
"""


def nvenc_probe() -> str:
    """In a child process: a driver without an NVENC engine must not take the benchmark down."""
    import subprocess

    try:
        r = subprocess.run([sys.executable, "-c", NVENC_PROBE], capture_output=True, text=True, timeout=60)
        return (r.stdout.strip() or f"probe exited {r.returncode}: {r.stderr.strip()[-200:]}")
    except subprocess.TimeoutExpired:
        return "probe timed out"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="real (default on CUDA) or tiny (default on CPU)")
    p.add_argument("--sizes", default="768x512x121,1920x1088x121,1920x1088x961", help="WxHxF,...")
    p.add_argument("--skip-961", action="store_true", help="leave out sizes above 121 frames")
    p.add_argument("--tile", default="auto", help="auto (memory plan), none, or frames per tile")
    p.add_argument("--reserve-gib", type=float, default=None, help="GPU memory held as the DiT's (default 36 on CUDA)")
    p.add_argument("--quick", action="store_true", help="only today's and the fast encoder settings")
    p.add_argument("--repeat", type=int, default=2, help="whole-stage runs (best of) at the first size")
    p.add_argument("--old-path-long", action="store_true", help="also today's path above 121 frames (minutes)")
    p.add_argument("--encode-only", action="store_true", help="x264 options only, on noise and testsrc2 (no VAE)")
    p.add_argument("--out", default=None, help="JSON file")
    a = p.parse_args()
    model = a.model or ("real" if a.device == "cuda" else "tiny")
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
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
    import os

    log(f"{device_name}, {os.cpu_count()} CPU cores, model {model}, {dtype}, reserved {0 if reserve is None else reserve.numel() / 2**30:.0f} GiB; "
        f"NVENC: {nvenc_probe()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            if a.encode_only:
                results.append(bench_encode_only(size, a, Path(tmp), log))
            else:
                results.append(bench_size(c, size, a, Path(tmp), log, first=size == sizes[0]))
    total = time.perf_counter() - t_start

    rows = []
    for r in results:
        for k, v in r["parts"].items():
            rows.append((r["size"], k, v))
        for k, v in r["whole"].items():
            if not isinstance(v, dict):
                rows.append((r["size"], "WHOLE " + k, v))
    print(f"\n{device_name}; tiles: " + ", ".join(f"{r['size']}={r['tile_frames']}" for r in results) +
          f"; bench took {total:.0f} s")
    print(f"| size | part | seconds |\n|---|---|---|")
    for size, k, v in rows:
        print(f"| {size} | {k} | {v:.3f} |")
    enc = [(r["size"], k, v) for r in results for k, v in r["encoders"].items()]
    if enc:
        print("\n| size | content / x264 settings | ms/frame | MB | PSNR dB vs source | vs source's 4:2:0 | vs today |"
              "\n|---|---|---|---|---|---|---|")
        for size, k, v in enc:
            print(f"| {size} | {k} | {v['ms_per_frame']:.2f} | {v['mb']:.1f} | {v['psnr_vs_source_db']:.2f} | "
                  f"{v['psnr_vs_420_db']:.2f} | {v['psnr_vs_today_db']:.2f} |")
    if a.out:
        write_json(a.out, {"date": datetime.date.today().isoformat(), "device": device_name, "cpu_cores": os.cpu_count(),
                           "command": " ".join(sys.argv), "model": model, "dtype": str(dtype), "results": results,
                           "log": lines, "seconds": total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
