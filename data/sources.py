"""Inputs for detect.py: an image file, a folder, a glob, a video file, a .txt list of paths, or a webcam index.

``MediaSource(source)`` resolves the source eagerly (an empty or missing source is a ConfigError naming it) and
iterates lazily over ``Frame``s; files that cannot be decoded are skipped with a warning, never fatal.
"""
from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from data.readers import IMG_EXTS, read_image  # one list: what the reader decodes is what a folder lists
from utils.general import LOGGER, ConfigError

VID_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".ts", ".asf", ".gif"}


@dataclass
class Frame:
    """One image to detect on.

    Attributes:
        path: the file (or ``webcam:<i>``) it came from.
        image: (H, W, 3) uint8 BGR, as OpenCV decodes it.
        kind: 'image', 'video' or 'webcam'.
        index: frame number in the video / stream (0 for images).
        count: total frames of the video (0 when unknown), 1 for images.
        file_index: position of ``path`` in the source list (for "i/n" log lines).
        fps: frames per second of the saved video (source fps / vid_stride; 30 when unknown); 0 for images.
    """

    path: str
    image: np.ndarray
    kind: str
    index: int = 0
    count: int = 1
    file_index: int = 0
    fps: float = 0.0


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VID_EXTS


def _media_in(paths: list[Path]) -> list[Path]:
    return sorted(p for p in paths if p.is_file() and p.suffix.lower() in IMG_EXTS | VID_EXTS)


def resolve_source(source: str | Path) -> list[Path] | int:
    """The files a source names, in order, or a webcam index (int) for a bare number like '0'.

    Folders and globs keep only image / video extensions; a single file or a .txt list is taken as given (a file
    that is not media is then skipped at read time, with a message).
    """
    s = str(source).strip()
    if s.isdigit():
        return int(s)
    p = Path(s).expanduser()
    if p.is_dir():
        files = _media_in(list(p.iterdir()))
        if not files:
            raise ConfigError(f"source '{s}': folder has no images or videos ({', '.join(sorted(IMG_EXTS))[:60]}...)")
        return files
    if p.is_file() and p.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
        # relative entries are relative to the list file, so a list travels with its images
        entries = [Path(ln) for ln in lines if ln and not ln.startswith("#")]
        files = [q if q.is_absolute() else p.parent / q for q in entries]
        if not files:
            raise ConfigError(f"source '{s}': list file names no paths")
        return files
    if p.is_file():
        return [p]
    if any(ch in s for ch in "*?["):
        files = _media_in([Path(f) for f in glob.glob(str(p), recursive=True)])
        if not files:
            raise ConfigError(f"source '{s}': glob matches no images or videos")
        return files
    raise ConfigError(f"source '{s}' not found (expected an image, video, folder, glob, .txt list or webcam index)")


class MediaSource:
    """Iterate over the frames of a detect.py source.

    Args:
        source: path / folder / glob / .txt list / webcam index as a string.
        vid_stride: keep every ``vid_stride``-th video or webcam frame.
    """

    def __init__(self, source: str | Path, vid_stride: int = 1) -> None:
        if int(vid_stride) < 1:
            raise ConfigError(f"--vid-stride {vid_stride}: expected a positive integer")
        self.source = str(source)
        self.vid_stride = int(vid_stride)
        resolved = resolve_source(source)
        self.webcam: int | None = resolved if isinstance(resolved, int) else None
        self.files: list[Path] = [] if isinstance(resolved, int) else resolved
        self.skipped: list[str] = []  # files that could not be read, for the caller's summary
        if self.webcam is not None:
            cap = cv2.VideoCapture(self.webcam)
            ok = cap.isOpened()
            cap.release()
            if not ok:
                raise ConfigError(f"source '{self.source}': no camera at webcam index {self.webcam}")

    def __len__(self) -> int:
        """Number of files (1 for a webcam)."""
        return 1 if self.webcam is not None else len(self.files)

    def _skip(self, path: Path | str, why: str) -> None:
        LOGGER.warning(f"skipping {path}: {why}")
        self.skipped.append(str(path))

    def __iter__(self) -> Iterator[Frame]:
        if self.webcam is not None:
            yield from self._stream(cv2.VideoCapture(self.webcam), f"webcam:{self.webcam}", "webcam", 0)
            return
        for i, p in enumerate(self.files):
            if not p.is_file():
                self._skip(p, "file not found")
            elif is_video(p):
                cap = cv2.VideoCapture(str(p))
                if not cap.isOpened():
                    cap.release()
                    self._skip(p, "unreadable video")
                    continue
                yield from self._stream(cap, str(p), "video", i)
            else:
                img, why = read_image(p)  # also catches truncated files, which cv2.imread half-decodes silently
                if img is None:
                    self._skip(p, f"unreadable image ({why})")
                    continue
                yield Frame(str(p), img, "image", 0, 1, i)

    def _stream(self, cap: cv2.VideoCapture, name: str, kind: str, file_index: int) -> Iterator[Frame]:
        """Frames of an opened capture, every vid_stride-th one; releases it however the iteration ends."""
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if kind == "video" else 0
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = (fps if np.isfinite(fps) and fps > 0 else 30.0) / self.vid_stride
        n = 0
        try:
            while True:
                if not cap.grab():  # grab without decoding, so skipped frames cost little
                    break
                if n % self.vid_stride == 0:
                    ok, img = cap.retrieve()
                    if ok and img is not None:
                        yield Frame(name, img, kind, n, count, file_index, max(fps, 1.0))
                n += 1
        finally:
            cap.release()
        if n == 0:
            self._skip(name, "no frames could be decoded")
