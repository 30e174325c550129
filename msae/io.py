"""Saving and loading SAE run directories (SAELens layout), and reading SAELens and dictionary_learning SAEs.

A run directory holds `sae_weights.safetensors` (W_enc, b_enc, W_dec, b_dec, threshold) and `cfg.json` in
SAELens's layout plus our own fields. Every write goes to a temp file beside its target, is flushed to disk and
then renamed over it, so a crash never leaves a half-written run. Nothing is ever unpickled: dictionary_learning's
`ae.pt` is read with torch's weights-only loader. Every loader checks the files against their config and raises
`SAELoadError` with one line naming the file and the problem.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor

from msae.faults import pause_at
from msae.sae import SAE

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
DL_WEIGHTS_FILE = "ae.pt"
DL_CFG_FILE = "config.json"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
"""EleutherAI sparsify's weights; its cfg.json shares our name, with its own fields."""

_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")
"""How torch.save archives (zip) and binary pickles begin; such a file is refused, never unpickled."""


class SAELoadError(ValueError):
    """An SAE's files are missing, unreadable or inconsistent; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------- atomic writes


def _temp_path(path: Path) -> Path:
    """A fresh hidden name beside `path`: same directory, so the final rename cannot cross file systems."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's: the renames in it) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
"""Read once at import: reading it means setting it, which is not safe once threads run."""


def _mode_for(path: Path) -> int:
    """The permissions a file replacing `path` gets: the old file's, else what open() would give a new one.
    Some writers (safetensors) create their files 0600 whatever the umask."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def _replace_files(writers: Mapping[Path, Callable[[Path], None]]) -> None:
    """Write each file to a temp file beside it, flush them all, then rename them all into place.

    A failure before the renames removes the temp files and leaves every existing file untouched; staging all
    files before renaming any keeps the window in which a crash mixes old and new files to a few renames. A
    replaced file keeps its permissions."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in writers.items():
            tmp = _temp_path(path)
            staged.append((tmp, path))
            write(tmp)
            os.chmod(tmp, _mode_for(path))
            _fsync(tmp)
        pause_at("files staged")
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # a directory can be opened and fsynced only on POSIX
        for directory in {path.parent for _, path in staged}:
            _fsync(directory)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Replace `path` with `data`, all or nothing."""
    _replace_files({Path(path): lambda tmp: tmp.write_bytes(data)})


def atomic_write_text(path: Path | str, text: str) -> None:
    """Replace `path` with `text` (UTF-8), all or nothing."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _write_sae_files(out_dir: Path | str, weights_name: str, write_weights: Callable[[Path], None], cfg_name: str,
                     config: Mapping[str, Any]) -> Path:
    """`out_dir` (made if needed) with an SAE's weights file and its JSON config, both replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2) + "\n"
    _replace_files({out_dir / weights_name: write_weights, out_dir / cfg_name: lambda tmp: tmp.write_text(text, encoding="utf-8")})
    return out_dir


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file's content. A process hashes a file once while it is unchanged (same size and
    modification time): training from a corpus asks for it for the cache key and again for cfg.json."""
    stat = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, _size: int, _mtime_ns: int, chunk: int = 1 << 20) -> str:
    """The hash itself, read in chunks (a 2 GB corpus never sits in memory); size and mtime key the cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_save_safetensors(tensors: dict[str, Tensor], path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """Replace `path` with a safetensors file of `tensors` (contiguous, CPU or not), all or nothing."""
    _replace_files({Path(path): lambda tmp: save_file(tensors, str(tmp), metadata=metadata)})


# ---------------------------------------------------------------------------------------------------- saving


SAE_LENS_LAYOUT = "6.54.12"
"""The SAELens release whose inference layout save_sae writes; any version >= 6 in cfg.json's metadata sends
SAELens down its 6.x loading path (without one it lifts model_name / hook_name from the top level, as before 6.0)."""


def _architecture_name(sae: SAE) -> str:
    """SAELens's name for the architecture the SAE was trained as."""
    if sae.activation == "batchtopk":
        return "matryoshka_batchtopk" if sae.n_groups > 1 else "batchtopk"
    return {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}[sae.activation]


def unexportable_reason(sae: SAE) -> str | None:
    """Why other tools cannot compute what our encode computes, or None when they can.

    SAELens and dictionary_learning run a BatchTopK SAE at inference as relu(pre) * (pre > θ): our rule for θ >= 0.
    Before θ is learned (θ < 0) our encode falls back to BatchTopK over the batch, while theirs is a plain ReLU."""
    if sae.activation == "batchtopk" and bool((sae.threshold < 0).any()):
        return (
            "its BatchTopK threshold θ was never learned (θ < 0): msae encodes it with BatchTopK over the batch, "
            "SAELens and dictionary_learning would encode it as a plain ReLU"
        )
    return None


def _saved_as_jumprelu(sae: SAE) -> bool:
    """BatchTopK with a learned θ is saved the way SAELens saves its own for inference: a JumpReLU SAE whose
    per-latent threshold is θ everywhere."""
    return sae.activation == "batchtopk" and unexportable_reason(sae) is None


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype's name as SAELens writes it: "float32" for torch.float32."""
    return str(dtype).removeprefix("torch.")


def _lm_metadata(msae_fields: Mapping[str, Any]) -> dict[str, Any]:
    """SAELens's metadata on the language model, from our own extraction record (empty when the SAE was trained
    on a tensor). hook_name is the module whose output we hook, as SAELens's AutoModelForCausalLM path names it;
    TransformerLens calls the same residual stream blocks.{L}.hook_resid_post."""
    from msae.lm import BUILTIN  # lm imports transformers only when it loads a model

    ext = msae_fields.get("extraction") or {}
    model, layer = ext.get("model"), ext.get("layer")
    if model is None or layer is None:
        return {}
    builtin = BUILTIN.get(model)
    return {
        "model_name": builtin.hub_id if builtin else model,
        **({"msae_model": model} if builtin else {}),
        "model_class_name": "AutoModelForCausalLM",
        "hook_name": f"model.layers.{layer}",
        "hook_name_transformer_lens": f"blocks.{layer}.hook_resid_post",
        "context_size": ext.get("ctx_len"),
        # Our corpus is tokenised without special tokens, and position 0 is dropped from training data.
        "prepend_bos": False,
    }


def sae_cfg(sae: SAE, dtype: torch.dtype | None = None, msae_fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The SAELens fields of cfg.json that describe `sae` stored in `dtype` (default: its own), with the language
    model taken from our own fields (`msae_fields`, cfg.json's "msae").

    BatchTopK runs with a learned θ are written as SAELens 6 writes them for inference (architecture jumprelu,
    the training architecture and k, matryoshka_widths under metadata); the rest under their own architecture.
    k, matryoshka_widths and rescale_acts_by_decoder_norm stay at the top level too, for our readers (SAELens
    ignores keys its config does not have)."""
    training = _architecture_name(sae)
    fields = {
        "architecture": "jumprelu" if _saved_as_jumprelu(sae) else training,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "matryoshka_widths": list(sae.widths),
        "dtype": dtype_name(dtype or sae.W_enc.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        # SAELens's training configs default this to True. The saved rows are unit (the norms are folded in), except
        # a TopK SAE from elsewhere whose rows differ: rescaling would change which latents it picks.
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAE_LENS_LAYOUT,
            "training_architecture": training,
            "training_architecture_details": {"k": sae.k, "matryoshka_widths": list(sae.widths)},
            **_lm_metadata(msae_fields or {}),
        },
    }
    reason = unexportable_reason(sae)
    if reason is not None:
        fields["not_exportable"] = f"msae export refuses this run: {reason}"
    return fields


_RANKING_RULES = ("topk", "batchtopk")
"""Rules that choose latents by comparing them with each other: scaling one latent alone would change the choice."""


def decoder_fold_factors(W_dec: Tensor, activation: str, eps: float) -> Tensor:
    """(d_sae,) what each latent is multiplied by (and its decoder row divided by) to give unit decoder rows.

    ReLU and JumpReLU latents fire on their own, so each row's own norm folds exactly (its threshold scaled with
    it). TopK and BatchTopK compare latents, so only a factor every row shares keeps their choice: the rows' mean
    norm, which is each row's own in the SAEs msae trains (unit rows at the training scale, 1/act_scale once the
    activation scale is folded in). Rows already unit to within 4 `eps` (the rounding of the dtype they come in
    or go to) get 1: a run saved again stays bit for bit."""
    norms = W_dec.double().norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    if activation in _RANKING_RULES:
        norms = norms.mean().expand_as(norms)
    if bool(((norms - 1).abs() <= 4 * eps).all()):
        return torch.ones_like(norms)
    return norms


def _unit_decoder_rows(t: dict[str, Tensor], activation: str, eps: float) -> None:
    """Fold the decoder rows' norms into the encoder (SAELens's fold_W_dec_norm, threshold included), in place:
    latent i becomes n_i times itself and its row 1/n_i times, so every reconstruction stays the same."""
    norms = decoder_fold_factors(t["W_dec"], activation, eps)
    t["W_enc"] = t["W_enc"] * norms
    t["b_enc"] = t["b_enc"] * norms
    t["W_dec"] = t["W_dec"] / norms[:, None]
    if "threshold" in t:
        t["threshold"] = t["threshold"] * (norms[0] if t["threshold"].dim() == 0 else norms)


@torch.no_grad()
def _raw_scale_weights(sae: SAE, act_scale: float, dtype: torch.dtype) -> dict[str, Tensor]:
    """The SAE's tensors for raw inputs x when it was trained on x * act_scale (SAELens's
    fold_activation_norm_scaling_factor), with unit decoder rows (_unit_decoder_rows): the same latents up to one
    factor per latent, and reconstructions divided by act_scale. Computed in float64, then stored in `dtype`.

    The threshold is kept only where the rule uses it: JumpReLU's vector, BatchTopK's θ (filled out to one per
    latent when saved as JumpReLU, the scalar while unlearned). SAELens refuses an unexpected tensor, and without
    it our TopK and ReLU runs load there too."""
    folded = {
        "W_enc": sae.W_enc.double() * act_scale,
        "b_enc": sae.b_enc.double(),
        "W_dec": sae.W_dec.double() / act_scale,
        "b_dec": sae.b_dec.double() / act_scale,
    }
    if sae.activation in ("batchtopk", "jumprelu"):
        folded["threshold"] = sae.threshold.double()
    _unit_decoder_rows(folded, sae.activation, max(torch.finfo(sae.W_dec.dtype).eps, torch.finfo(dtype).eps))
    if _saved_as_jumprelu(sae):
        folded["threshold"] = folded["threshold"].expand(sae.d_sae)
    return {name: t.detach().to(device="cpu", dtype=dtype).contiguous() for name, t in folded.items()}


def save_sae(
    sae: SAE,
    run_dir: Path | str,
    cfg: dict[str, Any] | None = None,
    act_scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `sae` to `run_dir` (created if needed) as sae_weights.safetensors + cfg.json, both replaced
    atomically; returns `run_dir`.

    The SAE was trained on inputs multiplied by `act_scale`; the saved one works on raw inputs. `cfg` holds our
    own fields (model, layer, training settings, ... under "msae"), merged into cfg.json beside SAELens's; the
    model and layer under msae.extraction also fill SAELens's metadata. `sae` is not modified."""
    if not (math.isfinite(act_scale) and act_scale > 0):
        raise ValueError(f"act_scale must be a positive finite number, got {act_scale}")
    dtype = dtype or sae.W_enc.dtype
    fields = sae_cfg(sae, dtype, (cfg or {}).get("msae"))
    clashes = sorted(key for key, value in (cfg or {}).items() if key in fields and fields[key] != value)
    if clashes:
        raise ValueError(f"cfg contradicts the SAE on {', '.join(clashes)}")
    tensors = _raw_scale_weights(sae, act_scale, dtype)
    return _write_sae_files(run_dir, WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)), CFG_FILE, {**fields, **(cfg or {})})


# --------------------------------------------------------------------------------------------- reading files


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`."""
    if not path.is_file():
        raise SAELoadError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAELoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SAELoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_cfg(run_dir: Path | str) -> dict[str, Any]:
    """The cfg.json of a run directory."""
    return _read_json(Path(run_dir) / CFG_FILE)


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of `size` bytes that begins with `head` (its first 9 bytes at least) is laid out as
    safetensors: an 8-byte little-endian header length N, then N bytes of JSON that begin with '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def refuse_pickle(path: Path) -> None:
    """Refuse a pickle or torch.save archive where a safetensors file is expected, before anything reads it. A
    safetensors file whose header is 128 bytes long modulo 256 also begins with the byte 0x80 of a binary pickle;
    its layout tells it apart."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(_PICKLE_MAGIC) and not looks_like_safetensors(head, path.stat().st_size):
        raise SAELoadError(f"{path}: not a safetensors file (it looks like a pickle / torch.save file, never unpickled here)")


def is_temp_file(path: Path) -> bool:
    """A temp file `_replace_files` writes: a crash between writing and renaming can leave one behind."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    if not path.is_file():
        raise SAELoadError(f"{path}: missing")
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise SAELoadError(f"{path}: not a safetensors file, or truncated ({e})") from None


def _read_state_dict(path: Path) -> dict[str, Any]:
    """A torch.save'd state dict, read with the weights-only unpickler (tensors and plain containers only)."""
    if not path.is_file():
        raise SAELoadError(f"{path}: missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the restricted unpickler rejects or fails on, we do not load
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SAELoadError(f"{path}: cannot be read as a weights-only state dict ({first_line})") from None
    if not isinstance(state, dict):
        raise SAELoadError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


# -------------------------------------------------------------------------------------------- checking plans


@dataclass(frozen=True)
class _Stored:
    """Where one of our tensors lies in a file: its name there and its shape there, in dimension names."""

    name: str
    dims: tuple[str, ...]
    """Each "d_in" or "d_sae"; () for a scalar."""
    transposed: bool = False
    """_Stored as the transpose of ours (nn.Linear weights)."""
    optional: bool = False


@dataclass
class _Plan:
    """What a file promises: the SAE's shape and rule, and where each tensor lies."""

    cfg_path: Path
    d_in: int
    d_sae: int
    widths: list[int]
    activation: str
    k: int | None
    tensors: dict[str, _Stored]
    """Our name (W_enc, b_enc, W_dec, b_dec, threshold, ...) -> where it lies."""
    dim_keys: dict[str, str] = field(default_factory=lambda: {"d_in": "d_in", "d_sae": "d_sae"})
    """The config keys that gave d_in and d_sae, for messages."""


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _checked_tensors(state: Mapping[str, Any], plan: _Plan, weights_path: Path) -> dict[str, Tensor]:
    """Our tensors from a file's `state`, each present, floating, finite and of the shape the config gives."""
    dims = {"d_in": plan.d_in, "d_sae": plan.d_sae}
    out: dict[str, Tensor] = {}
    for ours, stored in plan.tensors.items():
        t = state.get(stored.name)
        if t is None:
            if stored.optional:
                continue
            raise SAELoadError(f"{weights_path}: tensor {stored.name} is missing (found {', '.join(sorted(state))})")
        if not isinstance(t, Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise SAELoadError(f"{weights_path}: {stored.name} is {kind}, expected a floating-point tensor")
        expected = tuple(dims[d] for d in stored.dims)
        if tuple(t.shape) != expected:
            same_rank = t.dim() == len(expected)
            wrong = [d for d, n in zip(stored.dims, t.shape) if dims[d] != n] if same_rank else list(stored.dims)
            source = ", ".join(f"{plan.dim_keys[d]}={dims[d]}" for d in dict.fromkeys(wrong))
            raise SAELoadError(
                f"{weights_path}: {stored.name} has shape {_shape(tuple(t.shape))}, expected {_shape(expected)}"
                + (f" from {plan.cfg_path.name} {source}" if source else "")
            )
        n_bad = int((~torch.isfinite(t)).sum())
        if n_bad:
            raise SAELoadError(f"{weights_path}: {stored.name} has {n_bad} NaN or Inf values")
        out[ours] = t.T if stored.transposed else t
    return out


def _is_positive_whole(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0 and value == int(value)


def _positive_int(value: Any, what: str, cfg_path: Path) -> int:
    """`value` as an int, if it is a positive whole number (SAELens writes k as a float)."""
    if not _is_positive_whole(value):
        raise SAELoadError(f"{cfg_path}: {what} must be a positive integer, got {value!r}")
    return int(value)


def _checked_widths(widths: Any, d_sae: int, what: str, cfg_path: Path, d_sae_key: str = "d_sae") -> list[int]:
    """Nested widths that are positive integers, strictly increasing and end at d_sae."""
    if not isinstance(widths, (list, tuple)) or not widths:
        raise SAELoadError(f"{cfg_path}: {what} must be a non-empty list, got {widths!r}")
    widths = [_positive_int(w, what, cfg_path) for w in widths]
    if any(b <= a for a, b in zip(widths, widths[1:])) or widths[-1] != d_sae:
        raise SAELoadError(f"{cfg_path}: {what} {widths} must be strictly increasing and end at {d_sae_key}={d_sae}")
    return widths


def _checked_k(k: Any, activation: str, d_sae: int, cfg_path: Path) -> int | None:
    """k: required by the top-k rules (1..d_sae); for ReLU and JumpReLU, which do not use it, kept when sound."""
    if activation not in ("topk", "batchtopk"):
        return int(k) if _is_positive_whole(k) else None
    if k is None:
        raise SAELoadError(f"{cfg_path}: k is missing")
    k = _positive_int(k, "k", cfg_path)
    if k > d_sae:
        raise SAELoadError(f"{cfg_path}: k={k} exceeds d_sae={d_sae}")
    return k


def _build_sae(plan: _Plan, tensors: Mapping[str, Tensor], device: torch.device | str, dtype: torch.dtype | None) -> SAE:
    """An SAE in eval mode holding `tensors` (ours, checked)."""
    dtype = dtype or tensors["W_enc"].dtype
    k_arg = {} if plan.k is None else {"k": plan.k}
    sae = SAE(plan.d_in, plan.widths, activation=plan.activation, dtype=dtype, device=device, init=False, **k_arg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name])
        if "threshold" in tensors:
            # Assigning replaces the scalar buffer, so a JumpReLU's (d_sae,) vector fits.
            sae.threshold = tensors["threshold"].to(device=device, dtype=dtype).clone()
    return sae.eval()


# ------------------------------------------------------------------------------------------ SAELens / ours


_SAE_LENS_ACTIVATIONS = {
    "standard": "relu",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "matryoshka_batchtopk": "batchtopk",
    "jumprelu": "jumprelu",
}
"""SAELens architecture -> our activation rule. SAELens saves trained (Matryoshka) BatchTopK SAEs for
inference as jumprelu, with the training settings (k, matryoshka_widths) under metadata."""

_PARAM_TENSORS = {
    "W_enc": _Stored("W_enc", ("d_in", "d_sae")),
    "b_enc": _Stored("b_enc", ("d_sae",)),
    "W_dec": _Stored("W_dec", ("d_sae", "d_in")),
    "b_dec": _Stored("b_dec", ("d_in",)),
}


def sae_lens_field(cfg: Mapping[str, Any], key: str) -> Any:
    """A cfg.json field wherever a SAELens version keeps it: at the top level, under metadata (6.x), under
    metadata's training_architecture_details (6.x inference saves), or in activation_fn_kwargs (before 6.0)."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), Mapping) else {}
    places = (cfg, metadata, metadata.get("training_architecture_details"), cfg.get("activation_fn_kwargs"))
    for place in places:
        if isinstance(place, Mapping) and place.get(key) is not None:
            return place[key]
    return None


def training_architecture(cfg: Mapping[str, Any]) -> str | None:
    """The architecture a SAELens-layout cfg.json's SAE was trained as: metadata.training_architecture for an
    inference save (a Matryoshka BatchTopK run is stored as jumprelu), else its architecture."""
    return sae_lens_field(cfg, "training_architecture") or cfg.get("architecture")


def _sae_lens_activation(cfg: Mapping[str, Any], cfg_path: Path) -> str:
    """Our activation rule for a SAELens cfg.json, old (activation_fn_str) or new (architecture)."""
    arch = cfg.get("architecture") or "standard"  # SAELens before 6.0 may omit it
    activation_fn = cfg.get("activation_fn_str") or cfg.get("activation_fn")
    if arch == "standard" and activation_fn == "topk":
        arch = "topk"  # before 6.0, TopK SAEs were "standard" with activation_fn_str "topk"
    if arch not in _SAE_LENS_ACTIVATIONS:
        raise SAELoadError(f"{cfg_path}: architecture {arch!r} is not supported (only {', '.join(_SAE_LENS_ACTIVATIONS)})")
    if arch == "standard" and activation_fn not in (None, "relu"):
        raise SAELoadError(f"{cfg_path}: activation_fn {activation_fn!r} is not supported (only relu and topk)")
    normalize = cfg.get("normalize_activations")
    if normalize not in (None, False, "none"):
        raise SAELoadError(
            f"{cfg_path}: normalize_activations={normalize!r} rescales inputs at run time; "
            "only SAEs with the scaling folded into their weights (normalize_activations 'none') are supported"
        )
    return _SAE_LENS_ACTIVATIONS[arch]


def _threshold_name(activation: str, state: Mapping[str, Any]) -> _Stored | None:
    """Where a SAELens file keeps the threshold: JumpReLU's per-latent vector (exp of log_threshold in older
    training saves), or BatchTopK's scalar (topk_threshold in SAELens training saves, threshold in ours)."""
    if activation == "jumprelu":
        name = "log_threshold" if "threshold" not in state and "log_threshold" in state else "threshold"
        return _Stored(name, ("d_sae",))
    if activation == "batchtopk":
        name = "topk_threshold" if "threshold" not in state and "topk_threshold" in state else "threshold"
        return _Stored(name, (), optional=True)
    return None


def _is_batchtopk_saved_as_jumprelu(cfg: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
    """A SAELens 6 inference save of a (Matryoshka) BatchTopK SAE, ours or SAELens's own: architecture jumprelu,
    a BatchTopK training_architecture and its k under metadata, and one threshold θ for every latent."""
    threshold = state.get("threshold")
    return (
        cfg.get("architecture") == "jumprelu"
        and sae_lens_field(cfg, "training_architecture") in ("batchtopk", "matryoshka_batchtopk")
        and sae_lens_field(cfg, "k") is not None
        and isinstance(threshold, Tensor)
        and threshold.dim() == 1
        and threshold.numel() > 0
        and bool((threshold == threshold[0]).all())
    )


def _sae_lens_plan(cfg: Mapping[str, Any], state: Mapping[str, Any], cfg_path: Path) -> _Plan:
    """What a SAELens-layout cfg.json (ours included) promises about its weights."""
    activation = _sae_lens_activation(cfg, cfg_path)
    d_in = _positive_int(cfg.get("d_in"), "d_in", cfg_path)
    d_sae = _positive_int(cfg.get("d_sae"), "d_sae", cfg_path)
    widths = sae_lens_field(cfg, "matryoshka_widths")
    widths = [d_sae] if widths is None else _checked_widths(widths, d_sae, "matryoshka_widths", cfg_path)
    tensors = dict(_PARAM_TENSORS)
    if _is_batchtopk_saved_as_jumprelu(cfg, state):
        activation = "batchtopk"  # read back as the run it was: θ is the constant threshold
        tensors["threshold"] = _Stored("threshold", ("d_sae",))
    elif (threshold := _threshold_name(activation, state)) is not None:
        tensors["threshold"] = threshold
    # SAELens before 6.0 could store a per-latent decoder multiplier (finetuning_scaling_factor).
    tensors["scaling_factor"] = _Stored("scaling_factor", ("d_sae",), optional=True)
    k = _checked_k(sae_lens_field(cfg, "k"), activation, d_sae, cfg_path)
    return _Plan(cfg_path, d_in, d_sae, widths, activation, k, tensors)


def _fold_decoder_norms(t: dict[str, Tensor]) -> None:
    """SAELens's rescale_acts_by_decoder_norm multiplies pre-activations by each decoder row's norm and decodes
    with unit rows; moving the norms into the encoder gives the same latents and reconstructions."""
    norms = t["W_dec"].norm(dim=1).clamp_min(1e-8)  # SAELens's own clamp
    t["W_enc"] = t["W_enc"] * norms
    t["b_enc"] = t["b_enc"] * norms
    t["W_dec"] = t["W_dec"] / norms[:, None]


def _fold_b_dec_into_b_enc(t: dict[str, Tensor]) -> None:
    """For SAEs that encode x rather than x - b_dec: x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)."""
    t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]


def _load_sae_lens(weights_path: Path, device: torch.device | str, dtype: torch.dtype | None) -> tuple[SAE, dict]:
    """An SAE from sae_weights.safetensors + cfg.json (ours or SAELens's, any version), and that cfg."""
    cfg = read_cfg(weights_path.parent)
    state = _read_safetensors(weights_path)
    plan = _sae_lens_plan(cfg, state, weights_path.parent / CFG_FILE)
    tensors = _checked_tensors(state, plan, weights_path)
    if "scaling_factor" in tensors:
        tensors["W_dec"] = tensors["W_dec"] * tensors.pop("scaling_factor")[:, None]
    threshold = plan.tensors.get("threshold")
    if threshold is not None and threshold.name == "log_threshold":
        tensors["threshold"] = tensors["threshold"].exp()
    if plan.activation == "batchtopk" and "threshold" in tensors:
        tensors["threshold"] = tensors["threshold"].flatten()[0]  # θ, also when stored once per latent
    if cfg.get("rescale_acts_by_decoder_norm") and plan.activation in ("topk", "batchtopk"):
        _fold_decoder_norms(tensors)
    if cfg.get("apply_b_dec_to_input") is False:
        _fold_b_dec_into_b_enc(tensors)
    return _build_sae(plan, tensors, device, dtype), cfg


# ---------------------------------------------------------------------------------------- dictionary_learning


_LINEAR_TENSORS = {
    "W_enc": _Stored("encoder.weight", ("d_sae", "d_in"), transposed=True),
    "b_enc": _Stored("encoder.bias", ("d_sae",)),
    "W_dec": _Stored("decoder.weight", ("d_in", "d_sae"), transposed=True),
    "b_dec": _Stored("b_dec", ("d_in",)),
}
_SCALAR_THRESHOLD = {"threshold": _Stored("threshold", (), optional=True)}

_DL_CLASSES: dict[str, tuple[str, dict[str, _Stored]]] = {
    "AutoEncoder": ("relu", {**_LINEAR_TENSORS, "b_dec": _Stored("bias", ("d_in",))}),
    # AutoEncoderTopK also stores a threshold, but its encode() keeps the top k of each row.
    "AutoEncoderTopK": ("topk", _LINEAR_TENSORS),
    "BatchTopKSAE": ("batchtopk", {**_LINEAR_TENSORS, **_SCALAR_THRESHOLD}),
    "MatryoshkaBatchTopKSAE": ("batchtopk", {**_PARAM_TENSORS, **_SCALAR_THRESHOLD}),
    "JumpReluAutoEncoder": ("jumprelu", {**_PARAM_TENSORS, "threshold": _Stored("threshold", ("d_sae",))}),
}
"""dictionary_learning's dict_class -> our activation rule and where its ae.pt keeps each tensor."""


def _dictionary_learning_widths(trainer: Mapping[str, Any], state: Mapping[str, Any], d_sae: int, cfg_path: Path) -> list[int]:
    """A MatryoshkaBatchTopKSAE's nested widths: the running sums of its group sizes (ae.pt's, else config's)."""
    stored = state.get("group_sizes")
    sizes = stored.tolist() if isinstance(stored, Tensor) else trainer.get("group_sizes")
    if sizes is None:
        raise SAELoadError(f"{cfg_path}: group_sizes missing from both it and {DL_WEIGHTS_FILE}")
    if isinstance(stored, Tensor) and trainer.get("group_sizes") not in (None, sizes):
        raise SAELoadError(f"{cfg_path}: group_sizes {trainer['group_sizes']} but {DL_WEIGHTS_FILE} has {sizes}")
    sizes = [_positive_int(s, "group_sizes", cfg_path) for s in sizes]
    widths = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    return _checked_widths(widths, d_sae, f"group_sizes {sizes} give widths", cfg_path, d_sae_key="dict_size")


def _dictionary_learning_plan(config: Mapping[str, Any], state: Mapping[str, Any], cfg_path: Path) -> _Plan:
    """What a dictionary_learning config.json (trainer section) promises about its ae.pt."""
    trainer = config.get("trainer")
    if not isinstance(trainer, Mapping):
        raise SAELoadError(f"{cfg_path}: no trainer section")
    dict_class = trainer.get("dict_class")
    if dict_class not in _DL_CLASSES:
        raise SAELoadError(f"{cfg_path}: dict_class {dict_class!r} is not supported (only {', '.join(_DL_CLASSES)})")
    activation, tensors = _DL_CLASSES[dict_class]
    d_in = _positive_int(trainer.get("activation_dim"), "activation_dim", cfg_path)
    d_sae = _positive_int(trainer.get("dict_size"), "dict_size", cfg_path)
    widths = _dictionary_learning_widths(trainer, state, d_sae, cfg_path) if dict_class == "MatryoshkaBatchTopKSAE" else [d_sae]
    k = trainer.get("k")
    stored_k = state.get("k")
    if isinstance(stored_k, Tensor):
        if k is not None and k != stored_k.item():
            raise SAELoadError(f"{cfg_path}: k={k} but {DL_WEIGHTS_FILE} has k={stored_k.item()}")
        k = stored_k.item()
    k = _checked_k(k, activation, d_sae, cfg_path)
    return _Plan(cfg_path, d_in, d_sae, widths, activation, k, dict(tensors), {"d_in": "activation_dim", "d_sae": "dict_size"})


def _dictionary_learning_cfg(sae: SAE, config: dict[str, Any]) -> dict[str, Any]:
    """A cfg.json-style description of a loaded dictionary_learning SAE, with its own config kept whole (and
    ours, where msae exported it, lifted to the top level as in our runs)."""
    ours = config.get("msae") if isinstance(config.get("msae"), dict) else None
    return {**sae_cfg(sae, msae_fields=ours), **({"msae": ours} if ours else {}), "dictionary_learning": config}


def _load_dictionary_learning(weights_path: Path, device: torch.device | str, dtype: torch.dtype | None) -> tuple[SAE, dict]:
    """An SAE from dictionary_learning's ae.pt + config.json (beside it, or one level up for checkpoints/)."""
    cfg_path = weights_path.parent / DL_CFG_FILE
    if not cfg_path.exists() and weights_path.parent.name == "checkpoints":
        cfg_path = weights_path.parent.parent / DL_CFG_FILE
    config = _read_json(cfg_path)
    state = _read_state_dict(weights_path)
    plan = _dictionary_learning_plan(config, state, cfg_path)
    tensors = _checked_tensors(state, plan, weights_path)
    if plan.activation == "jumprelu":  # its encode() does not subtract b_dec
        _fold_b_dec_into_b_enc(tensors)
    sae = _build_sae(plan, tensors, device, dtype)
    return sae, _dictionary_learning_cfg(sae, config)


def _dictionary_learning_class(sae: SAE) -> str:
    """The dictionary_learning class whose encode and decode compute what `sae`'s do."""
    if sae.activation == "batchtopk":
        return "MatryoshkaBatchTopKSAE" if sae.n_groups > 1 else "BatchTopKSAE"
    return {"relu": "AutoEncoder", "topk": "AutoEncoderTopK", "jumprelu": "JumpReluAutoEncoder"}[sae.activation]


@torch.no_grad()
def save_dictionary_learning(sae: SAE, out_dir: Path | str, msae_fields: Mapping[str, Any] | None = None) -> Path:
    """Write `sae` (raw scale) as dictionary_learning's trainSAE does: ae.pt, a torch.save'd dict of tensors
    only, holding every key its class's from_pretrained loads strictly, and config.json with a trainer section;
    `msae_fields` (our cfg.json's "msae") go beside it. In float32, the dtype of dictionary_learning's modules,
    with unit decoder rows as save_sae writes them.
    Both files are replaced atomically; returns `out_dir`."""
    reason = unexportable_reason(sae)
    if reason is not None:
        raise ValueError(f"cannot export to dictionary_learning: {reason}")
    dict_class = _dictionary_learning_class(sae)
    ours = {name: getattr(sae, name).detach().double().cpu() for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    _unit_decoder_rows(ours, sae.activation, max(torch.finfo(sae.W_dec.dtype).eps, torch.finfo(torch.float32).eps))
    ours = {name: t.float() for name, t in ours.items()}
    if dict_class == "JumpReluAutoEncoder":  # its encode does not subtract b_dec: the inverse of our fold on load
        ours["b_enc"] = ours["b_enc"] - ours["b_dec"] @ ours["W_enc"]
    state = {
        stored.name: (ours[name].T if stored.transposed else ours[name]).contiguous()
        for name, stored in _DL_CLASSES[dict_class][1].items()
    }
    trainer: dict[str, Any] = {"dict_class": dict_class, "activation_dim": sae.d_in, "dict_size": sae.d_sae}
    if sae.activation in ("topk", "batchtopk"):
        state["k"] = torch.tensor(sae.k, dtype=torch.int32)
        state.setdefault("threshold", torch.tensor(-1.0))  # AutoEncoderTopK's buffer; its encode keeps the top k
        trainer["k"] = sae.k
    if dict_class == "MatryoshkaBatchTopKSAE":
        sizes = [b - a for a, b in zip([0, *sae.widths], sae.widths)]
        state["group_sizes"] = torch.tensor(sizes)
        trainer["group_sizes"] = sizes
    lm = _lm_metadata(msae_fields or {})
    if lm:
        trainer["lm_name"] = lm["model_name"]
        trainer["layer"] = msae_fields["extraction"]["layer"]
    config = {"trainer": trainer, **({"msae": dict(msae_fields)} if msae_fields else {})}
    return _write_sae_files(out_dir, DL_WEIGHTS_FILE, lambda tmp: torch.save(state, tmp), DL_CFG_FILE, config)


# --------------------------------------------------------------------------------------------------- sparsify


_SPARSIFY_TENSORS = {
    "W_enc": _Stored("encoder.weight", ("d_sae", "d_in"), transposed=True),
    "b_enc": _Stored("encoder.bias", ("d_sae",)),
    "W_dec": _Stored("W_dec", ("d_sae", "d_in")),
    "b_dec": _Stored("b_dec", ("d_in",)),
}
"""Where sparsify's SparseCoder keeps each tensor (its state dict as save_model writes it)."""


def _sparsify_plan(cfg: Mapping[str, Any], cfg_path: Path) -> _Plan:
    """What a sparsify cfg.json (SparseCoderConfig's fields plus d_in) promises: a TopK SAE whose encode is
    relu(W_enc (x - b_dec) + b_enc), the top k of each row. Its other kinds compute something else and are refused."""
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAELoadError(f"{cfg_path}: sparsify activation {activation!r} is not supported (only topk)")
    for flag, what in (("transcode", "a transcoder (it predicts another module's output)"),
                       ("skip_connection", "a skip connection (W_skip)")):
        if cfg.get(flag):
            raise SAELoadError(f"{cfg_path}: {what} is not supported")
    d_in = _positive_int(cfg.get("d_in"), "d_in", cfg_path)
    if cfg.get("num_latents"):
        d_sae, d_sae_key = _positive_int(cfg["num_latents"], "num_latents", cfg_path), "num_latents"
    else:
        d_sae = d_in * _positive_int(cfg.get("expansion_factor"), "expansion_factor (num_latents is 0)", cfg_path)
        d_sae_key = "d_in × expansion_factor"
    widths = cfg.get("matryoshka_widths")  # ours, where msae exported a nested TopK SAE; sparsify ignores it
    widths = [d_sae] if widths is None else _checked_widths(widths, d_sae, "matryoshka_widths", cfg_path, d_sae_key)
    k = _checked_k(cfg.get("k"), "topk", d_sae, cfg_path)
    return _Plan(cfg_path, d_in, d_sae, widths, "topk", k, dict(_SPARSIFY_TENSORS), {"d_in": "d_in", "d_sae": d_sae_key})


def _load_sparsify(weights_path: Path, device: torch.device | str, dtype: torch.dtype | None) -> tuple[SAE, dict]:
    """An SAE from sparsify's sae.safetensors + cfg.json (one hookpoint's folder of a sparsify run)."""
    cfg_path = weights_path.parent / CFG_FILE
    config = _read_json(cfg_path)
    plan = _sparsify_plan(config, cfg_path)
    sae = _build_sae(plan, _checked_tensors(_read_safetensors(weights_path), plan, weights_path), device, dtype)
    ours = config.get("msae") if isinstance(config.get("msae"), dict) else None
    return sae, {**sae_cfg(sae, msae_fields=ours), **({"msae": ours} if ours else {}), "sparsify": config}


def sparsify_refusal(sae: SAE) -> str | None:
    """Why sparsify cannot compute what `sae` computes, or None: its SparseCoder has a per-row TopK only."""
    if sae.activation != "topk":
        return f"sparsify's SparseCoder computes a per-row TopK only, and this SAE is {_architecture_name(sae)}"
    return None


@torch.no_grad()
def save_sparsify(sae: SAE, out_dir: Path | str, msae_fields: Mapping[str, Any] | None = None) -> Path:
    """Write a TopK `sae` as sparsify's SparseCoder.save_to_disk does (sae.safetensors + cfg.json with its
    SparseCoderConfig fields and d_in), unit decoder rows as save_sae writes them, in the SAE's dtype; our nested
    widths and `msae_fields` go beside sparsify's fields in cfg.json (its loader drops fields it does not know).
    Both files are replaced atomically; returns `out_dir`."""
    reason = sparsify_refusal(sae)
    if reason is not None:
        raise ValueError(f"cannot export to sparsify: {reason}")
    dtype = sae.W_enc.dtype
    ours = {name: getattr(sae, name).detach().double().cpu() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    _unit_decoder_rows(ours, sae.activation, torch.finfo(dtype).eps)
    state = {
        stored.name: (ours[name].T if stored.transposed else ours[name]).to(dtype).contiguous()
        for name, stored in _SPARSIFY_TENSORS.items()
    }
    config = {
        "activation": "topk",
        "expansion_factor": max(1, sae.d_sae // sae.d_in),  # unused: num_latents sets the width
        "normalize_decoder": True,
        "num_latents": sae.d_sae,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.d_in,
        "matryoshka_widths": list(sae.widths),
        **({"msae": dict(msae_fields)} if msae_fields else {}),
    }
    return _write_sae_files(out_dir, SPARSIFY_WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)), CFG_FILE, config)


# ---------------------------------------------------------------------------------------------------- loading


def load_sae(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> tuple[SAE, dict]:
    """An SAE in eval mode, and its config, from a run directory or a weights file.

    Reads our runs and SAELens's (sae_weights.safetensors + cfg.json; standard, topk, batchtopk, jumprelu,
    matryoshka_batchtopk), dictionary_learning's (ae.pt + config.json) and sparsify's TopK SAEs (sae.safetensors +
    cfg.json, one hookpoint's folder). The config is cfg.json as stored; for dictionary_learning and sparsify,
    SAELens-style fields plus their own config under "dictionary_learning" or "sparsify". `dtype` defaults to the
    stored one."""
    path = Path(path)
    if path.is_dir():
        if (path / SPARSIFY_WEIGHTS_FILE).exists() and not (path / WEIGHTS_FILE).exists():
            return _load_sparsify(path / SPARSIFY_WEIGHTS_FILE, device, dtype)
        if (path / WEIGHTS_FILE).exists() or (path / CFG_FILE).exists():
            return _load_sae_lens(path / WEIGHTS_FILE, device, dtype)
        if (path / DL_WEIGHTS_FILE).exists():
            return _load_dictionary_learning(path / DL_WEIGHTS_FILE, device, dtype)
        raise SAELoadError(
            f"{path}: holds neither {WEIGHTS_FILE} + {CFG_FILE}, {DL_WEIGHTS_FILE} + {DL_CFG_FILE} "
            f"nor {SPARSIFY_WEIGHTS_FILE} + {CFG_FILE}"
        )
    if not path.exists():
        raise SAELoadError(f"{path}: no such file or directory")
    if path.name == SPARSIFY_WEIGHTS_FILE:
        return _load_sparsify(path, device, dtype)
    if path.suffix == ".safetensors":
        return _load_sae_lens(path, device, dtype)
    if path.suffix == ".pt":
        return _load_dictionary_learning(path, device, dtype)
    raise SAELoadError(f"{path}: expected a run directory, a .safetensors file or a dictionary_learning .pt file")


def check_fits(sae: SAE, d_model: int, where: str, layer: int | None = None, n_layers: int | None = None) -> None:
    """Refuse an SAE whose input width differs from the activations it is about to see, or that reads a layer
    the model does not have."""
    if sae.d_in != d_model:
        raise SAELoadError(f"SAE expects d_in={sae.d_in} but {where} gives {d_model}")
    if layer is not None and n_layers is not None and not 0 <= layer < n_layers:
        raise SAELoadError(f"{where} does not exist: the model has layers 0 to {n_layers - 1}")
