"""The response's JPEG encode and base64 against another libjpeg-turbo binding, at the served quality.

The package encodes through Pillow (model.images.to_base64). simplejpeg encodes from the numpy array without a
PIL image; it is not a dependency, so this benchmark runs it only where it is installed. The image is synthetic
(gradients with noise, so neither flat nor pure noise); each figure is the median of --runs encodes in one process.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from bench import psnr_db
from model.images import to_base64
from model.resolutions import Resolution
from model.schema import DEFAULT_OUTPUT_QUALITY


def synthetic_image(size: Resolution, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0 : size.height, 0 : size.width]
    smooth = np.stack([(x / 4) % 256, (y / 4) % 256, ((x + y) / 8) % 256], axis=-1)
    noisy = smooth + np.random.default_rng(seed).normal(0, 12, smooth.shape)
    return noisy.clip(0, 255).astype(np.uint8)


def median_ms(encode: Callable[[], str], runs: int) -> float:
    encode()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        encode()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e3, 2)


def decoded(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))


def encoders(pixels: np.ndarray, quality: int) -> dict[str, Callable[[], str]]:
    image = Image.fromarray(pixels)
    found: dict[str, Callable[[], str]] = {"pillow": lambda: to_base64(image, "jpeg", quality)}
    try:
        import simplejpeg
    except ImportError:
        return found
    # Pillow's JPEG defaults: 4:2:0 chroma subsampling.
    found["simplejpeg"] = lambda: base64.b64encode(
        simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB", colorsubsampling="420")
    ).decode("ascii")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="1024x1024,1536x1296")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    for size in map(Resolution.parse, args.resolutions.split(",")):
        pixels = synthetic_image(size)
        for name, encode in encoders(pixels, DEFAULT_OUTPUT_QUALITY).items():
            encoded = encode()
            result = {
                "size": str(size),
                "encoder": name,
                "median_ms": median_ms(encode, args.runs),
                "base64_bytes": len(encoded),
                "psnr_db": psnr_db(decoded(encoded), pixels),
            }
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
