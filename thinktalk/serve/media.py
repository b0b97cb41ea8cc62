"""Media from requests, checked before the model sees it: where it may come from, how big it may be.

    data:<mime>;base64,<payload>   always (the payload must be valid base64)
    file:///path                   only under --allowed-local-media-path (symlinks resolved, no way out)
    http(s)://host/path            only with --allow-remote-media, and only when every address the host resolves
                                   to is public (no loopback, link-local, private, multicast or reserved ranges);
                                   the connection goes to the checked address, never re-resolved; no redirects
Audio is decoded here, its header checked first (rate, length: max_audio_seconds), and handed on as
(samples, rate); images have their size read from the header before any decoding; videos have their container
probed (frame size, length, the sound track's length when it is heard) and pass on as bytes, or as the allowed
file's path. Every failure is a 400 naming the request field (`param`) and the cause.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np

from ..errors import InputError
from ..processing.audio import AudioTooLong, load_audio
from ..processing.multimodal import MediaOptions
from ..processing.video import probe_video
from ..processing.vision import PILLOW_DECODE_ERRORS
from .errors import APIError, bad_request
from .schemas import ServerLimits

AUDIO_RATE = 16000


@dataclass(frozen=True)
class MediaPolicy:
    limits: ServerLimits
    allowed_local_path: Path | None = None  # resolved
    allow_remote: bool = False


def engine_media_options(options: MediaOptions, limits: ServerLimits) -> MediaOptions:
    """The model's own media preparation under the server's limits, so that what it decodes (a video's sound track,
    an image whose size is known only once decoded) is held to the numbers the request was checked against."""
    vision = dataclasses.replace(options.vision, max_decode_pixels=min(options.vision.max_decode_pixels,
                                                                       limits.max_image_pixels))
    return dataclasses.replace(options, vision=vision, max_audio_seconds=limits.max_audio_seconds,
                               max_video_seconds=limits.max_video_seconds)


def _too_large(where: str, size: int, limit: int) -> APIError:
    return bad_request(f"{where}: media of {size} bytes is over the limit of {limit} bytes (max_media_bytes)",
                       param=where, code="media_too_large")


def decode_base64(payload: str, where: str, limit: int) -> bytes:
    if len(payload) > (limit + 2) // 3 * 4 + 4:
        raise _too_large(where, len(payload) * 3 // 4, limit)
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad_request(f"{where}: invalid base64 data ({error})", param=where, code="invalid_base64") from None
    if not data:
        raise bad_request(f"{where}: the media is empty", param=where, code="invalid_media")
    return data


def _data_url(url: str, where: str, limit: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise bad_request(f"{where}: malformed data URL (no ',' after the header)", param=where,
                          code="invalid_url")
    if not header.endswith(";base64"):
        raise bad_request(f"{where}: only base64 data URLs are accepted", param=where, code="invalid_url")
    return decode_base64(payload, where, limit)


def _local_file(url: str, where: str, policy: MediaPolicy) -> bytes:
    try:
        return local_path(url, where, policy).read_bytes()
    except OSError as error:  # it went away, or became unreadable, since it was checked
        raise bad_request(f"{where}: cannot read the file ({type(error).__name__})", param=where,
                          code="local_media_forbidden") from None


def _split(url: str, where: str):
    """urlsplit, with its ValueError (an unclosed IPv6 bracket, a bad port) as the client's 400."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing the port is what raises)
    except ValueError as error:
        raise bad_request(f"{where}: invalid URL ({error})", param=where, code="invalid_url") from None
    return parts


def local_path(url: str, where: str, policy: MediaPolicy) -> Path:
    """The resolved path of a file:// URL, when it lies under the allowed folder (symlinks followed first)."""
    if policy.allowed_local_path is None:
        raise bad_request(f"{where}: file:// URLs are not allowed on this server (see --allowed-local-media-path)",
                          param=where, code="local_media_forbidden")
    parts = _split(url, where)
    if parts.netloc not in ("", "localhost"):
        raise bad_request(f"{where}: file:// URLs must name a local path", param=where, code="invalid_url")
    refused = bad_request(f"{where}: the file is not an existing file under the allowed media folder",
                          param=where, code="local_media_forbidden")
    try:
        path = Path(unquote(parts.path)).resolve(strict=True)
    except ValueError:  # a NUL byte (%00) in the path
        raise bad_request(f"{where}: the file:// path holds a NUL byte", param=where, code="invalid_url") from None
    except (OSError, RuntimeError):  # missing, a name too long, a symlink loop
        raise refused from None
    if not path.is_relative_to(policy.allowed_local_path) or not path.is_file():
        raise refused
    size = path.stat().st_size
    if size > policy.limits.max_media_bytes:
        raise _too_large(where, size, policy.limits.max_media_bytes)
    return path


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def resolve_public(host: str, port: int, where: str) -> str:
    """The host's first address, after checking that every address it resolves to is public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as error:  # gaierror; an IDNA or NUL-bearing host name
        raise bad_request(f"{where}: cannot resolve host {host[:80]!r} ({error})", param=where,
                          code="remote_media_failed") from None
    addresses = [info[4][0] for info in infos]
    if not addresses or not all(is_public_address(a) for a in addresses):
        raise bad_request(f"{where}: the host {host[:80]!r} resolves to a non-public address; refused", param=where,
                          code="remote_media_forbidden")
    return addresses[0]


def _remote(url: str, where: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise bad_request(f"{where}: remote media URLs are not allowed on this server (see --allow-remote-media)",
                          param=where, code="remote_media_forbidden")
    parts = _split(url, where)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    if not host:
        raise bad_request(f"{where}: the URL has no host", param=where, code="invalid_url")
    address = resolve_public(host, port, where)
    literal = f"[{address}]" if ":" in address else address
    target = parts._replace(netloc=f"{literal}:{port}").geturl()
    limit = policy.limits.max_media_bytes
    chunks, size = [], 0
    try:
        with httpx.Client(timeout=policy.limits.remote_timeout_seconds, follow_redirects=False) as client:
            with client.stream("GET", target, headers={"Host": parts.netloc.rsplit("@", 1)[-1]},
                               extensions={"sni_hostname": host}) as response:
                if response.status_code != 200:
                    raise bad_request(f"{where}: the remote server answered HTTP {response.status_code}",
                                      param=where, code="remote_media_failed")
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(where, size, limit)
                    chunks.append(chunk)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as error:
        raise bad_request(f"{where}: fetching the URL failed ({type(error).__name__})", param=where,
                          code="remote_media_failed") from None
    return b"".join(chunks)


def fetch(url: str, where: str, policy: MediaPolicy) -> bytes:
    """The bytes a media URL names, under the server's policy."""
    scheme = url[:8].lower()
    if scheme.startswith("data:"):
        return _data_url(url, where, policy.limits.max_media_bytes)
    if scheme.startswith("file://"):
        return _local_file(url, where, policy)
    if scheme.startswith(("http://", "https://")):
        return _remote(url, where, policy)
    raise bad_request(f"{where}: unsupported URL; use a data: URL, file:// or http(s)://", param=where,
                      code="invalid_url")


def checked_video(url: str, where: str, policy: MediaPolicy, with_audio: bool) -> bytes | Path:
    """A video's bytes (a file:// URL: its allowed path), once its container declares a frame size, a length and,
    when its sound is heard, a sound track within the limits. Nothing is decoded here."""
    source = local_path(url, where, policy) if url[:7].lower() == "file://" else fetch(url, where, policy)
    limits = policy.limits
    try:
        info = probe_video(source)
    except InputError as error:
        raise bad_request(f"{where}: {error}", param=where, code="invalid_video") from None
    if info.frames < 1 or info.fps <= 0:
        raise bad_request(f"{where}: the video has no frames or no frame rate", param=where, code="invalid_video")
    if info.width * info.height > limits.max_image_pixels:
        raise bad_request(f"{where}: {info.width}x{info.height} video frames are over the limit of "
                          f"{limits.max_image_pixels} pixels (max_image_pixels)", param=where, code="video_too_large")
    if info.seconds > limits.max_video_seconds:
        raise bad_request(f"{where}: {info.seconds:.1f} s of video is over the limit of {limits.max_video_seconds:g} "
                          "s (max_video_seconds)", param=where, code="video_too_long")
    if with_audio and info.audio_seconds is not None and info.audio_seconds > limits.max_audio_seconds:
        raise bad_request(f"{where}: its sound track of {info.audio_seconds:.1f} s (heard: use_audio_in_video) is "
                          f"over the limit of {limits.max_audio_seconds:g} s (max_audio_seconds)", param=where,
                          code="audio_too_long")
    return source


def checked_audio(data: bytes, where: str, limits: ServerLimits) -> tuple[np.ndarray, int]:
    """Decoded mono 16 kHz samples, refused beyond `max_audio_seconds` (from the header when it says)."""
    try:
        samples = load_audio(data, sample_rate=AUDIO_RATE, max_seconds=limits.max_audio_seconds)
    except AudioTooLong as error:
        raise bad_request(f"{where}: {error.seconds:.1f} s of audio is over the limit of {error.limit:g} s "
                          f"(max_audio_seconds)", param=where, code="audio_too_long") from None
    except InputError as error:
        raise bad_request(f"{where}: {error}", param=where, code="invalid_audio") from None
    return samples, AUDIO_RATE


def checked_image(data: bytes, where: str, limits: ServerLimits) -> bytes:
    """The image's header is read (not its pixels) to refuse decompression bombs and non-images."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (Image.DecompressionBombError,) + PILLOW_DECODE_ERRORS as error:
        raise bad_request(f"{where}: not a readable image ({type(error).__name__})", param=where,
                          code="invalid_image") from None
    if width * height > limits.max_image_pixels:
        raise bad_request(f"{where}: a {width}x{height} image is over the limit of {limits.max_image_pixels} "
                          f"pixels (max_image_pixels)", param=where, code="image_too_large")
    return data
