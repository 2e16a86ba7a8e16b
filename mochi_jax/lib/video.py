"""Reading and writing video clips (imageio-ffmpeg) and images (Pillow) the way the Mochi
fine-tuner consumes them.

    frames = read_clip("clip.mp4", num_frames=37, fps=30, size=(480, 848))  # uint8 [37, 480, 848, 3]
    with VideoReader("long.mp4") as r:                                       # r.info: size, fps, duration
        frames = r.read([0, 1, 2, 300, 301], fps=30, size=(480, 848))       # {i: uint8 [480, 848, 3]}
    image = read_image("photo.jpg", size=(480, 848))                         # uint8 [1, 480, 848, 3]
    write_mp4("out.mp4", frames, fps=30)                                     # libx264, atomic
    x = to_unit(frames)                                                       # float32 in [-1, 1]

`read_clip` resamples in time by picking source frame floor(i * src_fps / fps) for output frame
i (the source rate comes from the container metadata), keeps the first `num_frames`, resizes
to *cover* the target (aspect ratio preserved, the short side fits) and centre-crops it;
`VideoReader.read` does the same for any set of output frames (several windows in one pass).
Images are turned upright by their EXIF orientation and resized the same way.

Videos are scaled and cropped inside ffmpeg's filter graph (scaler='ffmpeg', the default): swscale's
bilinear filter, which widens with the scale factor when shrinking (antialiased), scales the decoded
YUV frame and converts it to RGB at the output size in one step (`cover_filter`), and only the small
frames come through the pipe: about 3x faster than decoding full-size RGB frames and resizing them in
numpy, and closer to the original pixels (the chroma is interpolated rather than repeated). Python
keeps the wanted frames (ffmpeg stops after the last one), so the frame indices are the ones ffmpeg
numbers at the container's rate, as before. scaler='numpy' is the earlier path, kept for comparison
(benchmarks/prepare_throughput.py): full-size RGB frames resized in numpy; the two differ by about
1/255 on average (resampling noise).

Images, and videos with scaler='numpy', are resized by our own separable triangle (bilinear) filter in
numpy (a few taps per output pixel), widened by the scale factor when shrinking so that it averages
instead of aliasing (the same idea as PIL's BILINEAR). It is deterministic, has no extra dependency,
and resizes one frame at a time so memory stays at the size of the output clip.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SCALERS = ("ffmpeg", "numpy")
DEFAULT_SCALER = "ffmpeg"  # what VideoReader and read_clip use when no scaler is named
# swscale flags of the ffmpeg scaler: bilinear (a triangle widened by 1/scale when shrinking, like our
# numpy filter), chroma interpolated to every output pixel and exact rounding (without these two, odd
# sizes and offsets shift the chroma: 4/255 off on a portrait source). On a textured 1080p clip to
# 480x848, the filters alone (both fed the same RGB frames) are 0.20/255 from numpy's with bilinear,
# 0.33 area, 0.38 bicubic, 0.37 lanczos; from YUV all are ~1.2/255 from the numpy path (its chroma is
# repeated, not interpolated) and closer to the frames before encoding (0.74/255 bilinear, 0.76 area,
# 0.79 bicubic, 0.81 lanczos; numpy path 1.18). Decoding dominates the time: area is as fast, lanczos slower.
FFMPEG_SCALE_FLAGS = "bilinear+full_chroma_int+accurate_rnd"


class VideoError(ValueError):
    """A clip that cannot be used. `kind` is one of 'zero-byte', 'unreadable', 'too short', 'too small'."""

    def __init__(self, path, kind: str, detail: str):
        super().__init__(f"{path}: {kind}: {detail}")
        self.path, self.kind, self.detail = str(path), kind, detail


# ----------------------------------------------------------------------------- conversions

def to_unit(frames) -> np.ndarray:
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]."""
    return np.asarray(frames, np.float32) / 127.5 - 1.0


def from_unit(x) -> np.ndarray:
    """float in [-1, 1] (values outside are clipped) -> uint8 in [0, 255]."""
    return np.round((np.clip(np.asarray(x, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


# ----------------------------------------------------------------------------- resizing

def resize_weights(n_in: int, n_out: int, offset: int = 0, count: int | None = None) -> np.ndarray:
    """[count, n_in] float32 rows mapping n_in samples to output samples offset..offset+count of an
    n_out-sample resize (pixel centres aligned, triangle filter widened by 1/scale when shrinking,
    rows renormalised at the borders)."""
    count = n_out - offset if count is None else count
    scale = n_out / n_in
    support = max(1.0, 1.0 / scale)
    centres = (np.arange(offset, offset + count) + 0.5) / scale - 0.5  # in input pixel coordinates
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def cover_crop(height: int, width: int, size) -> tuple[tuple[int, int], tuple[int, int]]:
    """For a height x width frame and target size (H, W): ((resized H, resized W), (top, left))
    of the resize that covers the target with the aspect ratio kept, and its centre crop."""
    th, tw = size
    scale = max(th / height, tw / width)
    rh, rw = max(th, round(height * scale)), max(tw, round(width * scale))
    return (rh, rw), ((rh - th) // 2, (rw - tw) // 2)


def cover_filter(height: int, width: int, size) -> str:
    """The ffmpeg filter graph (-vf) doing `cover_crop`'s resize and crop of height x width frames to
    size (H, W) as RGB: the scale converts to rgb24 at the output size (so odd sizes and crop offsets
    are exact, which they are not in 4:2:0 YUV), then the crop."""
    (rh, rw), (top, left) = cover_crop(height, width, size)
    graph = f"scale={rw}:{rh}:flags={FFMPEG_SCALE_FLAGS},format=rgb24"
    return graph if (rh, rw) == tuple(size) else f"{graph},crop={size[1]}:{size[0]}:{left}:{top}"


def banded(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A resize matrix [n_out, n_in] whose rows are each nonzero on a short run of inputs, as
    (index int [n_out, K], weight float32 [n_out, K]): output o = sum_k weight[o, k] * input[index[o, k]].
    K is the longest run (a few taps: about 2 / scale when shrinking); shorter runs pad with weight 0."""
    nonzero = weights != 0
    first = nonzero.argmax(axis=1)
    last = weights.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
    k = int((last - first).max()) + 1
    index = np.minimum(first[:, None] + np.arange(k)[None, :], weights.shape[1] - 1)
    taps = np.take_along_axis(weights, index, axis=1)
    taps[first[:, None] + np.arange(k)[None, :] > weights.shape[1] - 1] = 0.0  # clipped padding
    return index, taps.astype(np.float32)


class _Resizer:
    """Cover-resize + centre-crop of [H, W, 3] uint8 frames to `size` with precomputed filters.

    Each pass is a sum of a few shifted, weighted copies (the filter's taps; `banded`), plain numpy
    element-wise work: ~100x faster than a dense einsum and, unlike a BLAS product, safe in threads
    that run while others start ffmpeg (OpenBLAS's fork handler can deadlock on a BLAS call in flight)."""

    def __init__(self, height: int, width: int, size):
        (rh, rw), (top, left) = cover_crop(height, width, size)
        self.rows = resize_weights(height, rh, top, size[0])  # [H_out, H_in]
        self.cols = resize_weights(width, rw, left, size[1])  # [W_out, W_in]
        self.row_index, self.row_taps = banded(self.rows)
        self.col_index, self.col_taps = banded(self.cols)
        self.identity = (height, width) == tuple(size)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.identity:
            return frame
        x = self.row_taps[:, 0, None, None] * frame[self.row_index[:, 0]]  # [H_out, W_in, 3] float32
        for k in range(1, self.row_index.shape[1]):
            x += self.row_taps[:, k, None, None] * frame[self.row_index[:, k]]
        y = self.col_taps[None, :, 0, None] * x[:, self.col_index[:, 0]]  # [H_out, W_out, 3]
        for k in range(1, self.col_index.shape[1]):
            y += self.col_taps[None, :, k, None] * x[:, self.col_index[:, k]]
        return np.clip(np.round(y), 0, 255).astype(np.uint8)


def resize_cover(frames, size) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, size[0], size[1], 3]: cover-resize, then centre-crop."""
    frames = np.asarray(frames)
    resize = _Resizer(frames.shape[1], frames.shape[2], size)
    return np.stack([resize(f) for f in frames])


# ----------------------------------------------------------------------------- reading

def _nonempty(path) -> Path:
    """`path` as a Path, or VideoError if it cannot be read or holds 0 bytes."""
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        raise VideoError(path, "unreadable", f"cannot stat the file ({e.strerror or e})") from e
    if nbytes == 0:
        raise VideoError(path, "zero-byte", "the file is empty (0 bytes)")
    return path


def _ffmpeg():
    """imageio_ffmpeg (its ffmpeg binary), imported on first use: the sampler imports this module, and
    rendering to arrays needs neither ffmpeg nor Pillow (imported in the image functions)."""
    import imageio_ffmpeg

    return imageio_ffmpeg


def _open(path, probe: bool = False):
    """(frame generator positioned after the metadata, metadata) or VideoError. probe=True: only the
    metadata (ffmpeg is asked for 0 frames and closed at once), as (None, metadata)."""
    path = _nonempty(path)
    try:
        gen = _ffmpeg().read_frames(str(path), output_params=["-frames:v", "0"] if probe else None)
        meta = next(gen)
    except Exception as e:  # ffmpeg's messages are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VideoError(path, "unreadable", f"ffmpeg cannot open it ({first})") from e
    fps, size = meta.get("fps") or 0.0, meta.get("size")
    if probe or not size or fps <= 0 or not math.isfinite(fps):
        gen.close()
    if not size or fps <= 0 or not math.isfinite(fps):
        raise VideoError(path, "unreadable", f"no frame size or frame rate in its metadata ({meta})")
    return (None if probe else gen), meta


def _ffmpeg_frames(path: Path, graph: str, size, count: int):
    """The first `count` frames ffmpeg gives for `path` through the filter graph `graph`, as uint8
    [size[0], size[1], 3] arrays; ffmpeg is killed when the generator is closed early. The frames are
    numbered as `read_frames` numbers them (the same image2pipe output, so the same frame rate
    handling). VideoError when ffmpeg gives no frame and fails, or its output ends mid-frame."""
    h, w = size
    cmd = [_ffmpeg().get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-nostats", "-loglevel", "error", "-i", str(path),
           "-vf", graph, "-frames:v", str(count), "-f", "image2pipe", "-pix_fmt", "rgb24", "-vcodec", "rawvideo", "-"]
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a stream of decode errors cannot block ffmpeg
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        n = 0
        try:
            while True:
                frame = np.empty((h, w, 3), np.uint8)
                view, got = memoryview(frame).cast("B"), 0
                while got < view.nbytes:
                    k = proc.stdout.readinto(view[got:])
                    if not k:
                        break
                    got += k
                if got == 0:
                    break
                if got < view.nbytes:
                    raise VideoError(path, "unreadable", f"frame {n} has {got} bytes, expected {view.nbytes} "
                                                         f"(ffmpeg: {_log_line(log, proc)})")
                n += 1
                yield frame
            if n == 0 and proc.wait() != 0:
                raise VideoError(path, "unreadable", f"ffmpeg decoded no frames ({_log_line(log, proc)})")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()


def _log_line(log, proc) -> str:
    """The first line ffmpeg wrote to `log` (once it has exited), or its exit status."""
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    log.seek(0)
    text = log.read(4096).decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else f"exit status {proc.returncode}"


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says: frame size, frame rate and duration (seconds; None if unknown)."""
    height: int
    width: int
    fps: float
    duration: float | None

    def frames_at(self, fps: float) -> int | None:
        """How many output frames at `fps` the video holds, from its duration (source frames
        round(duration * src_fps); output frame i exists while floor(i * src_fps / fps) is one of
        them); None when the duration is unknown. An estimate: containers round the duration."""
        if not self.duration:
            return None
        n_src = round(self.duration * self.fps)
        return max(0, math.ceil((n_src - 1e-6) / (self.fps / fps))) if n_src > 0 else 0


def source_index(i: int, src_fps: float, fps: float) -> int:
    """The source frame shown by output frame i at `fps`: floor(i * src_fps / fps) (tiny epsilon
    against 2.9999...)."""
    return math.floor(i * src_fps / fps + 1e-6)


class VideoReader:
    """A video's `info` right after opening, then `read(wanted, fps, size)` for the output frames it
    needs.

        with VideoReader("clip.mp4") as r:
            size = choose(r.info)
            frames = r.read(range(37), fps=30, size=size)  # {i: uint8 [H, W, 3]}

    scaler='ffmpeg' (DEFAULT_SCALER; None means it): opening asks ffmpeg for the metadata only, and each
    `read` runs one ffmpeg that decodes, scales and crops (`cover_filter`). scaler='numpy': one ffmpeg
    for probing and reading, full-size RGB frames resized in numpy (`_Resizer`); one `read` per reader.
    """

    def __init__(self, path, scaler: str | None = None):
        self.path = Path(path)
        self.scaler = scaler or DEFAULT_SCALER
        if self.scaler not in SCALERS:
            raise ValueError(f"scaler must be one of {SCALERS}, got {self.scaler!r}")
        self._gen, meta = _open(path, probe=self.scaler == "ffmpeg")
        w, h = meta["size"]
        duration = meta.get("duration")
        duration = float(duration) if isinstance(duration, (int, float)) and math.isfinite(duration) else None
        self.info = VideoInfo(int(h), int(w), float(meta["fps"]), duration if duration and duration > 0 else None)
        self.source_frames = 0  # source frames decoded by read()
        self.ended = False  # read() reached the end of the video

    def close(self):
        if self._gen is not None:
            self._gen.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, wanted, fps: float = 30, size=(480, 848), upscale: bool = True) -> dict[int, np.ndarray]:
        """The output frames `wanted` (indices at `fps`; output frame i shows source frame
        floor(i * src_fps / fps)), cover-resized and centre-cropped to size (H, W): {i: uint8 [H, W, 3]}
        for those the video has. Decoding stops as soon as the last wanted frame is read; frames in
        between are decoded but not kept (the ffmpeg scaler also scales them: picking them inside ffmpeg,
        with a select filter, would number the decoded frames, which for a variable-frame-rate video
        are not the constant-rate frames numbered here). VideoError when the video cannot be decoded
        or (with upscale=False) is smaller than `size`."""
        path, info = self.path, self.info
        h, w = info.height, info.width
        if not upscale and (h < size[0] or w < size[1]):
            raise VideoError(path, "too small", f"{w}x{h} (WxH) is smaller than the {size[1]}x{size[0]} bucket "
                                                "and upscaling is off")
        wanted = sorted(set(int(i) for i in wanted))
        out = {}
        if not wanted:
            return out
        picks = [source_index(i, info.fps, fps) for i in wanted]
        self.source_frames, self.ended = 0, False
        if self.scaler == "ffmpeg":
            frames, finish = _ffmpeg_frames(path, cover_filter(h, w, size), size, picks[-1] + 1), None
        else:
            frames, resize = self._gen, _Resizer(h, w, size)

            def finish(index, raw):
                frame = np.frombuffer(raw, np.uint8)
                if frame.size != h * w * 3:
                    raise VideoError(path, "unreadable", f"frame {index} has {frame.size} bytes, expected {h * w * 3}")
                return resize(frame.reshape(h, w, 3))
        k = 0
        try:
            for index, frame in enumerate(frames):
                self.source_frames = index + 1
                if picks[k] > index:
                    continue
                frame = finish(index, frame) if finish else frame
                while k < len(wanted) and picks[k] == index:
                    out[wanted[k]] = frame
                    k += 1
                if k == len(wanted):
                    break
            else:
                self.ended = True
        except VideoError:
            raise
        except Exception as e:
            raise VideoError(path, "unreadable", f"decoding failed after {self.source_frames} frames "
                                                 f"({type(e).__name__}: {_first_line(e)})") from e
        finally:
            if self.scaler == "ffmpeg":
                frames.close()  # stops ffmpeg
        if self.source_frames == 0:
            raise VideoError(path, "unreadable", "ffmpeg decoded no frames")
        return out


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def probe(path) -> tuple[int, int, float]:
    """(height, width, fps) of a video from its container metadata, or VideoError."""
    with VideoReader(path, scaler="ffmpeg") as r:  # metadata only
        return r.info.height, r.info.width, r.info.fps


def read_clip(path, num_frames: int, fps: float = 30, size=(480, 848), upscale: bool = True,
              scaler: str | None = None) -> np.ndarray:
    """The first `num_frames` frames of `path` at `fps`, cover-resized and centre-cropped to size
    (H, W): uint8 [num_frames, H, W, 3]. Decoding stops as soon as the last needed frame is read.
    An image file (IMAGE_SUFFIXES) is a 1-frame clip (resized in numpy whatever `scaler` says);
    videos are resized by `scaler` (VideoReader's).

    Raises VideoError naming the file when it is empty, cannot be decoded, has fewer than
    num_frames frames at `fps`, or (with upscale=False) is smaller than `size` in either side.
    """
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        image = read_image(path, size, upscale)
        if num_frames != 1:
            raise VideoError(path, "too short", f"an image is 1 frame, need {num_frames}")
        return image
    with VideoReader(path, scaler) as r:
        frames = r.read(range(num_frames), fps, size, upscale)
        if len(frames) < num_frames:
            raise VideoError(path, "too short", f"{len(frames)} frames at {fps:g} fps ({r.source_frames} source "
                                                f"frames at {r.info.fps:g} fps), need {num_frames}")
    return np.stack([frames[i] for i in range(num_frames)])


# ----------------------------------------------------------------------------- images

def load_image(path) -> np.ndarray:
    """An image file (.jpg .png .webp, ...) as uint8 [H, W, 3] RGB, turned upright by its EXIF
    orientation (alpha dropped), or VideoError ('zero-byte', 'unreadable') naming it."""
    from PIL import Image, ImageOps

    path = _nonempty(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
        raise VideoError(path, "unreadable", f"not a readable image ({type(e).__name__}: {_first_line(e)})") from e


def read_image(path, size=(480, 848), upscale: bool = True) -> np.ndarray:
    """An image cover-resized and centre-cropped to size (H, W), as a 1-frame clip uint8 [1, H, W, 3]."""
    image = load_image(path)
    h, w = image.shape[:2]
    if not upscale and (h < size[0] or w < size[1]):
        raise VideoError(path, "too small", f"{w}x{h} (WxH) is smaller than the {size[1]}x{size[0]} bucket "
                                            "and upscaling is off")
    return resize_cover(image[None], size)


# ----------------------------------------------------------------------------- writing

def write_mp4(path, frames, fps: float = 30, quality: float = 8) -> Path:
    """Write uint8 [T, H, W, 3] frames as an H.264 mp4 (yuv420p; imageio-ffmpeg quality 0-10).

    Odd heights or widths are padded by one repeated edge row / column (yuv420p needs even
    sizes). The file is written under a temporary name in the same folder and renamed when
    complete, so `path` is either absent or a whole video.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix or '.mp4'}")
    try:
        # ffmpeg's own errors are not printed: a failed write is found below and named in one line
        writer = _ffmpeg().write_frames(str(tmp), (w + w % 2, h + h % 2), fps=fps, quality=quality,
                                        codec="libx264", macro_block_size=1, ffmpeg_log_level="fatal")
        try:
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        except OSError:  # ffmpeg died (a full disk): the check below says why
            pass
        writer.close()
        if not _whole_mp4(tmp):
            disk = os.statvfs(path.parent)
            if disk.f_bavail * disk.f_frsize < (1 << 20):  # less than 1 MiB left: the disk filled up
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            raise OSError(errno.EIO, "ffmpeg could not write the video", str(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _whole_mp4(path: Path) -> bool:
    """Whether `path` is an MP4 that was written to its end: its top-level boxes fill the file
    exactly and one is the index ('moov'), which ffmpeg writes last."""
    try:
        size, boxes = path.stat().st_size, set()
        with open(path, "rb") as f:
            at = 0
            while at + 8 <= size:
                f.seek(at)
                head = f.read(16)
                n, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if n == 1 and len(head) == 16:
                    n = int.from_bytes(head[8:16], "big")  # a 64-bit size
                if n < 8:
                    return False
                boxes.add(kind)
                at += n
        return at == size and b"moov" in boxes
    except OSError:
        return False


def write_image(path, frame) -> Path:
    """Write one uint8 [H, W, 3] frame as an image (format from the suffix, e.g. .png), atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        Image.fromarray(np.asarray(frame, np.uint8)).save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def evenly_spaced(n_total: int, n: int) -> np.ndarray:
    """n indices spread evenly over 0 .. n_total-1, first and last included."""
    return np.unique(np.round(np.linspace(0, n_total - 1, min(n, n_total))).astype(int))
