"""OpenAI chat messages to a DSVL conversation: earlier rounds, the question, the images.

DSVL's template has its own fixed system instruction and puts a round's images before its
question, so ``system``/``developer`` messages are ignored and an image part's position
inside a user message does not matter (only the order of images does). Consecutive user
messages form one round. Images come as ``data:`` URLs, or as local files under
``--allow-local-images DIR``; nothing is fetched from the network.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from runtime.serve.engine import Round


class RequestError(Exception):
    """A request this server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.headers = status, param, kind, headers


@dataclass
class ImageLimits:
    max_bytes: int = 20 << 20  # an encoded image
    max_pixels: int = 40_000_000  # decoded width x height
    max_aspect: float = 20.0  # long side / short side: a 5000x1 image would resize to Gpx
    local_root: Path | None = None  # --allow-local-images DIR


@dataclass
class Conversation:
    history: list[Round]
    question: str
    images: list


def parse_messages(messages: Any, limits: ImageLimits) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    rounds: list[tuple[list[str], list, str | None]] = []  # (texts, images, answer)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", param=where)
        role = message.get("role")
        if role in ("system", "developer"):
            continue
        if role == "user":
            texts, images = _user_content(message.get("content"), where, limits)
            if rounds and rounds[-1][2] is None:  # consecutive user messages: one round
                rounds[-1][0].extend(texts)
                rounds[-1][1].extend(images)
            else:
                rounds.append((texts, images, None))
        elif role == "assistant":
            if not rounds or rounds[-1][2] is not None:
                raise RequestError(f"{where}: an assistant message must answer a user message",
                                   param=where)
            rounds[-1] = (rounds[-1][0], rounds[-1][1], _assistant_text(message.get("content"), where))
        else:
            raise RequestError(f"{where}: unsupported role {role!r} (user, assistant or system)",
                               param=where)
    if not rounds or rounds[-1][2] is not None:
        raise RequestError("the last message must come from the user", param="messages")
    history = [Round("\n".join(t), imgs, answer or "") for t, imgs, answer in rounds[:-1]]
    texts, images, _ = rounds[-1]
    return Conversation(history, "\n".join(texts), images)


def _user_content(content: Any, where: str, limits: ImageLimits) -> tuple[list[str], list]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of parts", param=where)
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise RequestError(f"{at}: image_url needs a 'url' string", param=at)
            images.append(load_image_url(url, at, limits))
        else:
            raise RequestError(f"{at}: unsupported content part (text or image_url)", param=at)
    return texts, images


def _assistant_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"{where}: an assistant message holds text only", param=where)


def load_image_url(url: str, where: str, limits: ImageLimits) -> Image.Image:
    """A ``data:`` URL (or an allowed local path) to a decoded RGB image, within the limits."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or ";base64" not in header:
            raise RequestError(f"{where}: a data URL must be base64 (data:image/png;base64,...)",
                               param=where)
        if len(payload) * 3 // 4 > limits.max_bytes:
            raise RequestError(f"{where}: the image is over {limits.max_bytes} bytes "
                               "(--max-image-bytes)", status=413, param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}: the data URL is not valid base64", param=where) from None
    elif url.startswith(("http://", "https://")):
        raise RequestError(f"{where}: this server does not fetch images from the network; send a "
                           "data: URL", param=where)
    else:
        data = _local_file(url, where, limits)
    return decode_image(data, where, limits)


def _local_file(url: str, where: str, limits: ImageLimits) -> bytes:
    if limits.local_root is None:
        raise RequestError(f"{where}: local image paths are off; start the server with "
                           "--allow-local-images DIR, or send a data: URL", param=where)
    path = Path(url.removeprefix("file://")).resolve()
    root = limits.local_root.resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise RequestError(f"{where}: no image file {url} under --allow-local-images {root}",
                           param=where)
    if path.stat().st_size > limits.max_bytes:
        raise RequestError(f"{where}: the image is over {limits.max_bytes} bytes "
                           "(--max-image-bytes)", status=413, param=where)
    return path.read_bytes()


def decode_image(data: bytes, where: str, limits: ImageLimits) -> Image.Image:
    """Decode as ``runtime.preprocess.load_image`` opens a file (DSVL's
    ``Image.open(...).convert("RGB")``: no EXIF rotation), checking the size from the header
    before the pixels are decoded."""
    if len(data) > limits.max_bytes:
        raise RequestError(f"{where}: the image is over {limits.max_bytes} bytes "
                           "(--max-image-bytes)", status=413, param=where)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except Image.DecompressionBombError:
        raise RequestError(f"{where}: the image has over {limits.max_pixels} pixels "
                           "(--max-image-pixels)", status=413, param=where) from None
    except Exception as err:  # Pillow raises many types
        raise RequestError(f"{where}: cannot read the image ({_first_line(err)})", param=where) from None
    if width * height > limits.max_pixels:
        raise RequestError(f"{where}: the image has {width}x{height} pixels, over "
                           f"{limits.max_pixels} (--max-image-pixels)", status=413, param=where)
    if min(width, height) < 1 or max(width, height) / min(width, height) > limits.max_aspect:
        raise RequestError(f"{where}: the image is {width}x{height}; the aspect ratio is limited to "
                           f"{limits.max_aspect:g} (--max-image-aspect)", param=where)
    try:
        image.load()
        return image.convert("RGB")
    except Exception as err:
        raise RequestError(f"{where}: cannot decode the image ({_first_line(err)})", param=where) from None


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
