"""The embedded demo source: a small in-the-wild set built from photographs that ship
inside installed packages (matplotlib's sample data, scikit-image's data module), with
geometric and photometric variations, plus deliberately bad files so that every path of
the prepare stage runs. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import skimage.data
from PIL import Image, ImageOps

from mambastyle.data.inputs import InputRef, make_key


def _jpeg(img: Image.Image, quality: int = 92, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    # IHDR starts at byte 8: length(4) 'IHDR'(4) width(4) height(4) ...; patch and re-CRC.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _exif_rotated(img: Image.Image) -> bytes:
    """JPEG stored rotated by 90 degrees with an EXIF orientation tag that undoes it."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _jpeg(img.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def photos() -> dict[str, Image.Image]:
    """The packaged portrait photographs, as RGB images."""
    hopper = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    return {
        "grace_hopper": Image.open(hopper).convert("RGB"),
        "astronaut": Image.fromarray(skimage.data.astronaut()),
    }


def demo_files() -> dict[str, bytes]:
    """name -> file bytes: good photos with variations, and a corpus of bad inputs."""
    files: dict[str, bytes] = {}
    people = photos()
    for name, img in people.items():
        w, h = img.size
        files[f"{name}/original.jpg"] = _jpeg(img)
        files[f"{name}/rot_p15.jpg"] = _jpeg(
            img.rotate(15, Image.Resampling.BICUBIC, expand=True, fillcolor=(128,) * 3)
        )
        files[f"{name}/rot_m12.jpg"] = _jpeg(
            img.rotate(-12, Image.Resampling.BICUBIC, expand=True, fillcolor=(90,) * 3)
        )
        files[f"{name}/scale_150.jpg"] = _jpeg(img.resize((w * 3 // 2, h * 3 // 2), Image.Resampling.LANCZOS))
        files[f"{name}/flip.png"] = _png(ImageOps.mirror(img))
        files[f"{name}/jpeg_q25.jpg"] = _jpeg(img, quality=25)
        files[f"{name}/crop.jpg"] = _jpeg(img.crop((w // 8, h // 10, w - w // 10, h)))
        files[f"{name}/gray.png"] = _png(img.convert("L"))
        files[f"{name}/exif_rotated.jpg"] = _exif_rotated(img)
    hopper = people["grace_hopper"]
    files["formats/rgba.png"] = _png(hopper.convert("RGBA"))
    files["formats/cmyk.jpg"] = _jpeg(hopper.convert("CMYK"))
    arr16 = (np.asarray(hopper.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    files["formats/gray16.png"] = _png(Image.fromarray(arr16))  # 16-bit grayscale (mode I;16)
    # Two people in one picture: 'largest' keeps one, 'each' keeps both, 'reject' quarantines.
    astro = people["astronaut"].resize((hopper.width, hopper.width))
    pair = Image.new("RGB", (hopper.width * 2, max(hopper.height, astro.height)), (200, 200, 200))
    pair.paste(hopper, (0, 0))
    pair.paste(astro, (hopper.width, 0))
    files["group/two_people.jpg"] = _jpeg(pair)
    # Inputs that must be quarantined, each with its reason.
    files["bad/empty.jpg"] = b""
    files["bad/truncated.jpg"] = _jpeg(hopper)[:3000]
    files["bad/notes.txt"] = b"not an image, just some text\n"
    files["bad/bomb.png"] = _png_claiming_size(200_000, 200_000)
    files["bad/cat.jpg"] = _jpeg(Image.fromarray(skimage.data.chelsea()))
    files["bad/coffee.jpg"] = _jpeg(Image.fromarray(skimage.data.coffee()))
    files["bad/small_face.jpg"] = _jpeg(hopper.resize((hopper.width // 3, hopper.height // 3)))  # ~70 px face
    return files


def demo_inputs() -> list[InputRef]:
    """The demo set as inputs of the prepare stage (URIs ``demo://name``)."""
    return [
        InputRef(
            make_key(f"demo/{name}"),
            f"demo://{name}",
            data=data,
            version=hashlib.sha256(data).hexdigest()[:16],
        )
        for name, data in sorted(demo_files().items())
    ]
