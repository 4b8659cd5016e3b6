"""Decoding and validating images and videos: pure functions shared by the Spark job and the
single-process implementation.

Formats are sniffed from content, never from the file name (one MovieLens poster named .jpg is a
PNG). An image is valid when it fully decodes (a truncated JPEG fails ``load()``), is no larger
than ``max_bytes`` and has both sides at least ``min_side`` pixels. A video is a list of encoded
frames, or a multi-frame file (GIF, APNG, multi-page TIFF) that is split into PNG frames.
"""

from __future__ import annotations

import io
from typing import Optional

from PIL import Image, ImageSequence, UnidentifiedImageError


class Reason:
    """Machine-readable quarantine reasons (the ``reason`` column of ``quarantine``)."""

    MISSING_ITEM_ID = "missing_item_id"
    MISSING_USER_ID = "missing_user_id"
    MISSING_TITLE = "missing_title"
    UNPARSEABLE_TIMESTAMP = "unparseable_timestamp"
    INVALID_LABEL = "invalid_label"
    INVALID_RATING = "invalid_rating"
    INVALID_WEIGHT = "invalid_weight"
    UNKNOWN_ITEM = "unknown_item"
    #: The event's item is in the items input but was itself quarantined.
    ITEM_QUARANTINED = "item_quarantined"
    DUPLICATE_KEY = "duplicate_key"
    IMAGE_NOT_FOUND = "image_not_found"
    UNDECODABLE_IMAGE = "undecodable_image"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_SMALL = "image_too_small"
    VIDEO_NOT_FOUND = "video_not_found"
    UNDECODABLE_VIDEO = "undecodable_video"
    MISSING_TAG = "missing_tag"


def check_image(data: bytes, max_bytes: int, min_side: int) -> tuple[Optional[str], Optional[str]]:
    """Return ``(reason, detail)``; ``(None, None)`` when the image is valid."""
    if len(data) > max_bytes:
        return Reason.IMAGE_TOO_LARGE, f"{len(data)} bytes > {max_bytes}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            w, h = im.size
    except Image.DecompressionBombError as e:
        return Reason.IMAGE_TOO_LARGE, str(e)[:200]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return Reason.UNDECODABLE_IMAGE, f"{type(e).__name__}: {str(e)[:200]}"
    if min(w, h) < min_side:
        return Reason.IMAGE_TOO_SMALL, f"{w}x{h} < {min_side}"
    return None, None


def split_video(data: bytes) -> list[bytes]:
    """Split a multi-frame file into PNG frames; raises ``ValueError`` when it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            frames = []
            for frame in ImageSequence.Iterator(im):
                buf = io.BytesIO()
                frame.convert("RGB").save(buf, format="PNG", compress_level=1)
                frames.append(buf.getvalue())
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{type(e).__name__}: {str(e)[:200]}") from None
    if not frames:
        raise ValueError("no frames")
    return frames


def check_frames(frames: list[bytes], max_bytes: int, min_side: int):
    for k, f in enumerate(frames):
        reason, detail = check_image(f, max_bytes, min_side)
        if reason is not None:
            return Reason.UNDECODABLE_VIDEO, f"frame {k}: {reason}: {detail}"
    return None, None


def read_bytes(path: str) -> bytes:
    """Read a local path or a URI pyarrow understands (hdfs://, s3://, gs://)."""
    if "://" in path and not path.startswith("file://"):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(p) as f:
            return f.read()
    with open(path.removeprefix("file://"), "rb") as f:
        return f.read()


def validate_media(image: Optional[bytes], image_path: Optional[str], video: Optional[list],
                   video_path: Optional[str], max_bytes: int, min_side: int):
    """Validate one item's media. Returns ``(image, video, reason, detail)``: the image bytes (read
    from ``image_path`` when given as a path), the video frames, and the first failure."""
    if image is None and image_path:
        try:
            image = read_bytes(image_path)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            return None, None, Reason.IMAGE_NOT_FOUND, f"{image_path}: {type(e).__name__}"
        except OSError as e:
            return None, None, Reason.IMAGE_NOT_FOUND, f"{image_path}: {e}"[:200]
    if image is not None:
        reason, detail = check_image(image, max_bytes, min_side)
        if reason is not None:
            return None, None, reason, detail
    if video is None and video_path:
        try:
            video = split_video(read_bytes(video_path))
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return None, None, Reason.VIDEO_NOT_FOUND, video_path
        except (OSError, ValueError) as e:
            return None, None, Reason.UNDECODABLE_VIDEO, f"{video_path}: {e}"[:200]
    if video is not None:
        video = list(video)
        if not video:
            video = None
        else:
            reason, detail = check_frames(video, max_bytes, min_side)
            if reason is not None:
                return None, None, reason, detail
    return image, video, None, None

