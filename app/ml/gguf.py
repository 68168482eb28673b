"""GGUF files as bases: de-quantise a `.gguf` into a float Hugging Face directory, once.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=name)`, through the `gguf`
package) and de-quantises every tensor to float; we then `save_pretrained` with safetensors, so the
rest of the service (fingerprint, blobs, workers, replicas) only ever sees an ordinary HF directory
and never converts again. Failures are `GGUFError` (a ValueError) naming the file and the reason:
a missing path, a file that is not GGUF or is truncated, an architecture transformers cannot load
as a causal LM.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file that cannot become a base; the message names the file and why."""


def is_gguf_path(path) -> bool:
    return str(path).lower().endswith(".gguf")


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


def convert_gguf(gguf_path, out_dir) -> Path:
    """Write the float HF directory of `gguf_path` to `out_dir` (atomically: a temp dir renamed
    into place, so a crash leaves no half base). Returns `out_dir`; an existing complete one is kept."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path).resolve()
    out = Path(out_dir).resolve()
    if (out / "config.json").is_file():
        return out
    _check_file(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
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
        try:
            os.rename(tmp, out)
        except OSError:  # another process converted it meanwhile
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
