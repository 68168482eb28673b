"""GGUF files as bases: de-quantise a `.gguf` into a float Hugging Face directory, once.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=name)`, through the `gguf`
package) and de-quantises every tensor to float; we then `save_pretrained` with safetensors, so the
rest of the service (fingerprint, blobs, workers, replicas) only ever sees an ordinary HF directory
and never converts again. Failures are `GGUFError` (a ValueError) naming the file and the reason:
a missing path, a file that is not GGUF or is truncated, an architecture transformers cannot load
as a causal LM.

A converted directory carries `.gguf-source.json` (the GGUF's sha256). It is a hidden file, so
`app.store.base_registry` never uploads it: it only tells this machine that the directory is the conversion of
this very file, so a GGUF replaced under the same name is converted again rather than served stale.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = ".gguf-source.json"


class GGUFError(ValueError):
    """A GGUF file that cannot become a base; the message names the file and why."""


def is_gguf_path(path) -> bool:
    return str(path).lower().endswith(".gguf")


def gguf_sha256(path) -> str:
    """`sha256:` + hex of the file, the GGUF's identity."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def converted_from(out_dir) -> str | None:
    """The sha256 of the GGUF that `out_dir` was converted from (None: not a conversion)."""
    try:
        return json.loads((Path(out_dir) / SOURCE_FILE).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_converted(out_dir, gguf_path, sha256: str) -> None:
    """Record that `out_dir` holds the conversion of `gguf_path` (also after a download from blobs)."""
    (Path(out_dir) / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path), "sha256": sha256}))


def check_gguf(path) -> None:
    """Raise GGUFError unless `path` is a complete GGUF of an architecture transformers loads."""
    _check_file(Path(path))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        # The reader memory-maps the file and checks every tensor's extent against its size, so a
        # truncated download fails here rather than as garbage weights.
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors
        raise GGUFError(f"{path}: unreadable or truncated GGUF ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFError(f"{path}: GGUF has no general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not a causal LM transformers can load")


def convert_gguf(gguf_path, out_dir, sha256: str | None = None) -> Path:
    """Write the float HF directory of `gguf_path` to `out_dir` (atomically: a temp dir renamed
    into place, so a crash leaves no half base) and return it. An `out_dir` already converted from
    this file (same sha256) is kept; any other one there is replaced."""
    src = Path(gguf_path).resolve()
    out = Path(out_dir).resolve()
    _check_file(src)
    sha256 = sha256 or gguf_sha256(src)
    if (out / "config.json").is_file() and converted_from(out) == sha256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # processes sharing DATA_DIR (replicas starting together) convert one at a time, and the later
    # ones then find the conversion done instead of swapping it away under a process loading it
    fd = os.open(out.parent / f".{out.name}.convert.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the process dies
        if (out / "config.json").is_file() and converted_from(out) == sha256:
            return out
        return _convert(src, out, sha256)
    finally:
        os.close(fd)


def _convert(src: Path, out: Path, sha256: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    old = None
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        except Exception as e:
            raise GGUFError(f"{src}: cannot be loaded as a causal LM ({type(e).__name__}: {e})") from None
        # the weights are already de-quantised floats; only transformers' GGUF marker blocks saving
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        mark_converted(tmp, src, sha256)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the base from other users of DATA_DIR
        if out.exists():  # a stale conversion (another GGUF under this name): swap it out
            old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
            os.rename(out, old / "dir")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
