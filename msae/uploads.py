"""What users hand the app, checked by content before anything uses it: an SAE as sae_weights.safetensors +
cfg.json (saved as a run directory), text files of prompts or of a training corpus; and the model and layer a
run was trained on. Every problem raises `UploadError` with one line that names the file and what is wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from msae.corpus import SUPPORTED_SUFFIXES, CorpusError, file_documents
from msae.io import CFG_FILE, WEIGHTS_FILE, SAELoadError, check_fits, load_sae
from msae.run import Run

DEFAULT_MAX_UPLOAD_MB = 512
"""Largest file the app accepts, unless $MSAE_MAX_UPLOAD_MB says otherwise (an fp32 SAE of 65,536 latents on
d_in 576 is about 300 MB)."""
PROMPT_SUFFIXES = (".txt", ".csv", ".jsonl")


class UploadError(ValueError):
    """An uploaded file that cannot be used; the message names it and the problem."""


def max_upload_mb() -> int:
    """The upload limit in MB: $MSAE_MAX_UPLOAD_MB when it is a positive whole number, else the default."""
    value = os.environ.get("MSAE_MAX_UPLOAD_MB", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_MAX_UPLOAD_MB


def check_size(name: str, size: int, limit_mb: int | None = None) -> None:
    limit_mb = max_upload_mb() if limit_mb is None else limit_mb
    if size == 0:
        raise UploadError(f"{name}: the file is empty")
    if size > limit_mb * 2**20:
        raise UploadError(f"{name}: {size / 2**20:.1f} MB is over the upload limit of {limit_mb} MB "
                          f"(set MSAE_MAX_UPLOAD_MB to change it)")


def read_cfg_json(name: str, data: bytes) -> dict[str, Any]:
    """An SAE's cfg.json: UTF-8 JSON holding an object."""
    check_size(name, len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UploadError(f"{name}: not UTF-8 text (bad byte at {exc.start + 1}); {CFG_FILE} must be a JSON file") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UploadError(f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(cfg, dict):
        raise UploadError(f"{name}: holds a JSON {type(cfg).__name__}, not an object of SAE settings")
    return cfg


def check_safetensors(name: str, data: bytes) -> None:
    """The bytes are a complete safetensors file: an 8-byte header length, a JSON header of tensors whose data
    lies inside the file (the shapes are checked against cfg.json when the SAE is loaded)."""
    check_size(name, len(data))
    not_st = f"{name}: not a safetensors file"
    if len(data) < 8:
        raise UploadError(f"{not_st} (only {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or 8 + n > len(data):
        raise UploadError(f"{not_st} (its first 8 bytes do not give a header length that fits the file)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UploadError(f"{not_st} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UploadError(f"{not_st} (its header is not a JSON object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise UploadError(f"{name}: holds no tensors")
    payload = len(data) - 8 - n
    for key, entry in tensors.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise UploadError(f"{not_st} (tensor {key!r} has no data offsets)")
        if offsets[1] > payload:
            raise UploadError(f"{name}: truncated (tensor {key!r} ends at byte {offsets[1]:,} of a {payload:,}-byte payload)")


def safe_name(text: str) -> str:
    """A directory name made of letters, digits, '-', '_' and '.' (other characters become '-')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text.strip()).strip("-.")
    if not name:
        raise UploadError("give a name made of letters, digits, '-', '_' or '.'")
    return name


def save_sae_upload(weights: bytes, cfg_data: bytes, dest: Path, model: str | None = None, layer: int | None = None) -> Path:
    """Check the two files, record the model and layer (when given) in cfg.json, and save them as run
    directory `dest` once `load_sae` accepts them. An existing `dest` is never replaced."""
    check_safetensors(WEIGHTS_FILE, weights)
    cfg = read_cfg_json(CFG_FILE, cfg_data)
    dest = Path(dest)
    if dest.exists():
        raise UploadError(f"a run named {dest.name!r} exists already ({dest}); pick another name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        staged = Run(tmp)
        staged.import_files(weights, cfg)
        if model is not None or layer is not None:
            staged.set_source(model, layer)
        try:
            load_sae(tmp)
        except SAELoadError as exc:
            raise UploadError(str(exc).replace(str(tmp / WEIGHTS_FILE), WEIGHTS_FILE)
                              .replace(str(tmp / CFG_FILE), CFG_FILE).replace(str(tmp), "the upload")) from None
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def add_sae_upload(weights: bytes, cfg_data: bytes, dest: Path, model: str, layer: int,
                   load_model: Callable[[str], Any]) -> Path:
    """The Home page's "Add this SAE": the two files saved as run `dest` (save_sae_upload) and the SAE checked
    against the model it reads, `load_model(model)` (the caller's cached loader; None when the model cannot be
    loaded). A refusal raises UploadError and leaves nothing at `dest`."""
    save_sae_upload(weights, cfg_data, dest, model=model or None, layer=layer)
    lm = load_model(model)
    problem = None
    if lm is None:
        problem = f"its model {model!r} cannot be loaded here"
    else:
        try:
            check_fits(Run(dest).load_sae(), lm.d_model, f"{model} layer {layer}", layer=layer, n_layers=lm.n_layers)
        except SAELoadError as exc:
            problem = str(exc)
    if problem:
        shutil.rmtree(dest, ignore_errors=True)
        raise UploadError(f"the SAE does not fit: {problem}")
    return dest


def _documents(name: str, data: bytes, suffixes: Sequence[str], path: Path) -> list[str]:
    suffix = Path(name).suffix.lower()
    if suffix not in suffixes:
        raise UploadError(f"{name}: use a {', '.join(suffixes)} file (.csv and .parquet need a 'text' column, "
                          f".jsonl a \"text\" field on every line)")
    check_size(name, len(data))
    path.write_bytes(data)
    try:
        return [doc.text for doc in file_documents(path)]
    except CorpusError as exc:
        raise UploadError(str(exc).replace(str(path), name)) from None


def read_prompts(name: str, data: bytes, limit: int) -> tuple[list[str], int]:
    """Prompts of an uploaded file (.txt: blank-line separated; .csv: its 'text' column; .jsonl: the "text" field
    of each line), at most `limit`, and how many the file holds."""
    with tempfile.TemporaryDirectory(prefix="msae-prompts-") as tmp:
        texts = _documents(name, data, PROMPT_SUFFIXES, Path(tmp) / f"prompts{Path(name).suffix.lower()}")
    return texts[:limit], len(texts)


def save_corpus_upload(name: str, data: bytes, dest_dir: Path) -> Path:
    """An uploaded training corpus, checked like `msae train --corpus` reads it, saved as dest_dir/corpus.<ext>."""
    dest_dir = Path(dest_dir)
    created = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"corpus{Path(name).suffix.lower()}"
    try:
        _documents(name, data, SUPPORTED_SUFFIXES, path)
    except UploadError:
        path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(dest_dir, ignore_errors=True)  # nothing of a refused upload stays behind
        raise
    return path
