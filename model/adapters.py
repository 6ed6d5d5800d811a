"""A request's LoRA adapters, from what it names to tensors checked against the transformer's layers.

A request names an adapter by a preset (config.yaml's `lora_presets`), an https URL to a `.safetensors` file, or
a Hugging Face reference, `owner/repo` or `owner/repo/path/file.safetensors`, fetched with the `hf_access_token`
secret. Files are kept on disk by their content's sha256, the least recently used removed past `lora_disk_mb`;
the prepared tensors of recent adapters stay in host memory, so a repeated adapter swaps without reading the disk.
Nothing here holds the pipeline's lock: a slow URL never stalls other requests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import torch

from model.lora import AdapterError, PreparedAdapter, network_alphas, prepare
from model.remote import FetchError, FetchPolicy, fetch, fetch_bytes

log = logging.getLogger(__name__)

# huggingface_hub's variable for another hub endpoint (a mirror, or a test's local server).
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
HF_REFERENCE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<file>[\w./-]+\.safetensors))?$")
HOST_MEMORY_BYTES = 4 << 30  # prepared adapters kept on the host: a rank-64 FLUX.1 adapter in bf16 is ~0.3 GB
SAFETENSORS_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # the float dtypes, by bytes per element
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class AppliedAdapter:
    """What a response lists for each adapter: the request's url, its scale, and the sha256 of the file applied."""

    url: str
    scale: float
    sha256: str


class AdapterStore:
    def __init__(
        self,
        layers: Mapping[str, tuple[int, int]],
        max_rank: int,
        dtype: torch.dtype,
        directory: Path,
        disk_bytes: int,
        presets: Mapping[str, str],
        allow_private_urls: bool,
        hf_token: str | None = None,
    ) -> None:
        self.layers = layers
        self.max_rank = max_rank
        self.dtype = dtype
        self.directory = directory
        self.disk_bytes = disk_bytes
        self.presets = dict(presets)
        self.hf_token = hf_token
        # The largest file an adapter within max_rank can be (fp32, every layer), and room for its header.
        largest = sum(max_rank * (n_in + n_out) * 4 for n_in, n_out in layers.values()) + (16 << 20)
        self.policy = FetchPolicy(max_bytes=largest, allow_private=allow_private_urls)
        self._by_url: dict[str, str] = {}
        self._prepared: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self._in_use: Counter[Path] = Counter()
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> tuple[str, PreparedAdapter]:
        """The sha256 and prepared tensors of the adapter `name` names. Raises FetchError (the name or its file
        could not be had) or AdapterError (the file is not an adapter this deployment can apply)."""
        url = self.presets.get(name, name)
        with self._lock:
            sha = self._by_url.get(url)
            if sha is not None and sha in self._prepared:
                self._prepared.move_to_end(sha)
                return sha, self._prepared[sha]
        path = self._file(url, sha)
        try:
            prepared = self._prepare(path)
        finally:
            with self._lock:
                self._in_use[path] -= 1
        sha = path.stem
        with self._lock:
            self._by_url[url] = sha
            self._prepared[sha] = prepared
            self._prepared.move_to_end(sha)
            while sum(p.nbytes for p in self._prepared.values()) > HOST_MEMORY_BYTES and len(self._prepared) > 1:
                self._prepared.popitem(last=False)
            self._evict()
        return sha, prepared

    def _file(self, url: str, sha: str | None) -> Path:
        """The adapter's file on disk, fetched unless a file of the same content is there, and counted in use until
        the caller is done reading it (no eviction removes it meanwhile)."""
        if sha is not None:
            path = self.directory / f"{sha}.safetensors"
            with self._lock:
                if path.is_file():
                    os.utime(path)  # most recently used
                    self._in_use[path] += 1
                    return path
        source, headers, header_host = self._source(url)
        handle, partial = tempfile.mkstemp(dir=self.directory, suffix=".partial")
        os.close(handle)
        try:
            fetch(source, Path(partial), self.policy, headers, header_host)
            check_safetensors(Path(partial))
            digest = _sha256(Path(partial))
            path = self.directory / f"{digest}.safetensors"
            with self._lock:
                os.replace(partial, path)
                self._in_use[path] += 1
        finally:
            Path(partial).unlink(missing_ok=True)
        log.info("LoRA adapter %s fetched: sha256 %s, %d bytes", url, digest, path.stat().st_size)
        return path

    def _source(self, url: str) -> tuple[str, dict[str, str], str]:
        """Where to fetch `url` from, the headers to send, and the only host they may go to."""
        if "://" in url:
            return url, {}, ""
        match = HF_REFERENCE.match(url)
        if match is None:
            known = ", ".join(sorted(self.presets)) or "none are configured"
            raise FetchError(
                "not an https URL, a Hugging Face reference (owner/repo or owner/repo/file.safetensors) or a preset "
                f"name (presets: {known})"
            )
        host = urlsplit(HF_ENDPOINT).hostname or ""
        headers = {"Authorization": f"Bearer {self.hf_token}"} if self.hf_token else {}
        repo, file = match["repo"], match["file"] or self._only_safetensors(match["repo"], headers, host)
        return f"{HF_ENDPOINT}/{repo}/resolve/main/{quote(file)}", headers, host

    def _only_safetensors(self, repo: str, headers: dict[str, str], host: str) -> str:
        policy = FetchPolicy(8 << 20, 30, self.policy.allow_private)
        listing = fetch_bytes(f"{HF_ENDPOINT}/api/models/{repo}", policy, headers, host)
        try:
            files = [entry["rfilename"] for entry in json.loads(listing)["siblings"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(f"the hub's listing of {repo} could not be read") from exc
        candidates = [name for name in files if name.endswith(".safetensors")]
        if len(candidates) != 1:
            found = ", ".join(candidates[:5]) or "none"
            raise FetchError(
                f"{repo} holds {len(candidates)} .safetensors files ({found}): name one, as {repo}/FILE.safetensors"
            )
        return candidates[0]

    def _prepare(self, path: Path) -> PreparedAdapter:
        # Imported here: diffusers' conversion is needed only where LoRA is on.
        from diffusers import FluxPipeline
        from safetensors.torch import load_file

        state = load_file(str(path))
        try:
            converted = FluxPipeline.lora_state_dict(state, return_alphas=True)
        except (ValueError, KeyError) as exc:
            raise AdapterError(f"its keys match no FLUX.1 layer ({str(exc).strip()[:200]})") from exc
        state_dict, alphas = converted if isinstance(converted, tuple) else (converted, None)
        return prepare(state_dict, network_alphas(alphas), self.layers, self.max_rank, self.dtype)

    def _evict(self) -> None:
        """Remove the least recently used files past the disk budget, never one being read. Under self._lock."""
        files = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files[:-1]:  # the newest stays, whatever its size
            if total <= self.disk_bytes:
                break
            if not self._in_use[path]:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)


def check_safetensors(path: Path) -> None:
    """Raise FetchError unless `path` is a well-formed safetensors file, reading only its header: every tensor's
    dtype a float, and its bytes inside the file, one after another."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise FetchError("not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise FetchError("not a safetensors file (its header length is out of range)")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FetchError("not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise FetchError("not a safetensors file (its header is not a table)")
    end = 0
    for name, entry in sorted(
        ((n, e) for n, e in header.items() if n != "__metadata__"),
        key=lambda item: item[1].get("data_offsets", [0])[0] if isinstance(item[1], dict) else 0,
    ):
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise FetchError(f"not a LoRA file: tensor {name!r} is not a float tensor")
        offsets, shape = entry.get("data_offsets"), entry.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[0] == end and offsets[1] >= end):
            raise FetchError(f"not a safetensors file (tensor {name!r} has bad offsets)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise FetchError(f"not a safetensors file (tensor {name!r} has a bad shape)")
        if math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]] != offsets[1] - offsets[0]:
            raise FetchError(f"not a safetensors file (tensor {name!r} has a bad size)")
        end = offsets[1]
    if 8 + length + end != size:
        raise FetchError("not a safetensors file (its size does not match its header)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
