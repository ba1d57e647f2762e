"""Plumbing shared by the four modules (it imports none of them); nothing here is the paper. In
order: the command line and run folders, several processes (torchrun), files (JSONL, images,
prompt files, parquet streams), model loading (hub id, local folder or tiny-random), the
backends (transformers, the `openai` client), the toy world (``ToyCritic``, ``ToyTeacher``:
demonstrations, not models) and pictures (``caption_grid``)."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, Union, get_args, get_origin, get_type_hints

def _interrupted_while_starting(signum, frame):
    print("\ninterrupted while starting; nothing was written: run the same command again",
          file=sys.stderr)
    os._exit(130)

# Ctrl-C while the libraries import (before `run` is reached) is one line and exit 130 too; only in
# one of our commands (a Python session importing us keeps its own handler)
if Path(sys.argv[0]).stem.replace("-", "_") in ("rationalrewards", "parrot", "rl_nft", "gcr_loop"):
    signal.signal(signal.SIGINT, _interrupted_while_starting)

# torch, transformers, diffusers, datasets: imported where used (here they would slow `--help`)
from PIL import (Image, ImageDraw, ImageFilter, ImageFont, ImageOps, ImageStat,
                 UnidentifiedImageError)

# Warnings no user can act on: bitsandbytes' missing optional CPU kernel (the CPU path runs here),
# peft calling transformers' old gradient-checkpointing names, and peft on rl_nft's second policy.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated")
warnings.filterwarnings("ignore", message="Already found a `peft_config`")

# next to the modules (a checkout, `pip install -e .`), else where a regular install put them
HERE = Path(__file__).resolve().parent
PROMPTS_DIR = next((d for d in (HERE / "prompts", HERE / "share" / "rationalrewards" / "prompts",
                                Path(sys.prefix) / "share" / "rationalrewards" / "prompts")
                    if d.is_dir()), HERE / "prompts")
_held_locks = {}  # run folder -> its open lock file (`start_run`), held until the process ends

class ModelLoadError(RuntimeError):
    """A model, adapter or dataset could not be found or loaded; the message says how to get it."""

class BackendError(RuntimeError):
    """The model server failed or did not answer."""

class LazyModule:
    """Stands for the module `name` and imports it on first use (say `torch.zeros`): a command's
    `--help` and argument errors then answer without the seconds that importing it takes."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):  # every use: what the module holds now (a test may patch it)
        import importlib
        return getattr(importlib.import_module(self._name), attr)


# ---- Command line and run folders ----
def default_text(text: str):
    """A None default that --help states in words, e.g. `(default: 3e-4 t2i, 2e-4 edit)`, when it
    depends on other flags (`main` fills it in, and args.json records the value used)."""
    return field(default=None, metadata={"default": text})

def parse(cls, argv=None, description: Optional[str] = None):
    """The dataclass `cls` (a dict {name: dataclass}: subcommands) from the command line (tyro). An
    Optional flag is shown as `--lr FLOAT`, not `--lr {None}|FLOAT`, with its default once."""
    import tyro
    classes = list(cls.values()) if isinstance(cls, dict) else [cls]
    for klass in [k for c in classes for k in c.__mro__ if is_dataclass(k)]:
        hints, own = get_type_hints(klass, include_extras=True), vars(klass)["__annotations__"]
        for f in fields(klass):
            kinds = get_args(hints[f.name])
            if f.name not in own or f.default is not None or len(kinds) != 2 \
                    or get_origin(hints[f.name]) is not Union or kinds[1] is not type(None):
                continue
            choices = get_args(kinds[0]) if get_origin(kinds[0]) is Literal else None
            metavar = "{" + ",".join(choices) + "}" if choices else kinds[0].__name__.upper()
            own[f.name] = Annotated[hints[f.name], tyro.conf.arg(
                metavar=metavar, help_behavior_hint=f"(default: {f.metadata.get('default')})")]
    if isinstance(cls, dict):
        return tyro.extras.subcommand_cli_from_dict(cls, args=argv, description=description)
    return tyro.cli(cls, args=argv, description=description)

def run(main, rerun: str = "run the same command again") -> None:
    """Run a command's main(): a problem the user can fix is one line `error: ...` and exit 2,
    never a traceback; Ctrl-C is one line and exit 130 (files are whole: a rerun continues)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on: KeyboardInterrupt
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"\ninterrupted; {rerun} to continue", file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(130)  # not sys.exit: it would wait for HTTP worker threads inside a request
    except SystemExit as err:
        if not isinstance(err.code, str):
            raise
        if RANK == 0:  # the same bad input on every rank: said once
            print(f"error: {err.code}", file=sys.stderr)
        sys.exit(2)
    except (ModelLoadError, BackendError, FileNotFoundError, ValueError, FloatingPointError) as err:
        if RANK == 0 or isinstance(err, (BackendError, FloatingPointError)):  # may be one rank's
            print(f"{f'[rank {RANK}] ' if RANK else ''}error: {err}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # the reader went away (`... --help | head`): nothing to report
        os._exit(0)
    except OSError as err:  # disk full, read-only folder: what was written before is whole
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}. Everything written before this is kept: fix "
              f"the cause and {rerun} to continue", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)

def require(ok: bool, message: str, error=SystemExit) -> None:
    """One check of the input: `error: message` when it fails (`run` prints either kind)."""
    if not ok:
        raise error(message)

def require_positive(args, *names) -> None:
    """Counts must be >= 1 (None means "no limit" where a flag allows it)."""
    for name in names:
        value = getattr(args, name)
        require(value is None or value >= 1,
                f"--{name.replace('_', '-')} must be a positive number, got {value}")

def check_device(device: Optional[str]) -> None:
    """--device names a device this machine has, checked before anything loads (no CUDA context)."""
    if device is None:
        return
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SystemExit(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    count = torch.cuda.device_count()  # 0 without a GPU or a CUDA build
    require(dev.type != "cuda" or (dev.index or 0) < count,
            f"--device {device}: {count} CUDA GPU(s) visible here (--device cpu runs without one)")

def check_writable_dir(path) -> None:
    """--out (if given) is a folder we can write, or can be made (nothing is created here)."""
    if path is None:
        return
    path = Path(path)
    require(not path.exists() or path.is_dir(), f"--out {path} is a file, not a directory")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    require(existing.is_dir(), f"--out {path}: {existing} is a file, not a directory")
    require(os.access(existing, os.W_OK | os.X_OK),
            f"cannot write to --out {path}: {existing} is not writable")

def check_same_run(out, args, keys, paths=(), extra=None, changeable=()) -> None:
    """Refuse to continue `out` when args.json holds other `keys` (`paths` compared resolved,
    `extra`: input digests), e.g. old outputs under a new model; a `changeable` one is said."""
    saved_path, extra = Path(out) / "args.json", extra or {}
    if not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"{saved_path} is damaged (not JSON): delete {out} to start over") \
            from None
    now = {**asdict(args), **extra}
    saved = {**{k: getattr(type(args), k, None) for k in keys}, **saved}  # newer flags: defaults
    norm = lambda k, v: str(Path(v).resolve()) if k in paths and v else v

    def say(k):  # a flag by its name; a digest by the file it stands for
        if k in extra:
            return f"the content of the file(s) behind --{k.split('_')[0]} changed since then"
        return f"--{k.replace('_', '-')}: {saved.get(k)!r} then, {now[k]!r} now"
    diff = [say(k) for k in (*keys, *extra) if norm(k, saved.get(k)) != norm(k, now[k])]
    if diff:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(diff)}). "
                         f"Use another --out, or delete {out} to start over.")
    for k in changeable:
        if k in saved and norm(k, saved[k]) != norm(k, now[k]):
            warn(f"{out}: {say(k)}: continuing with the new value")

def start_run(out, args, extra=None) -> None:
    """Lock the run folder (writable, checked) on rank 0 (fcntl.flock on out/.lock, freed by the OS
    however the process ends: a second run into it stops, every rank), then write args.json."""
    import fcntl
    check_writable_dir(out)
    key, busy = str(Path(out).resolve()), False
    if RANK == 0 and key not in _held_locks:  # this process may hold it already (the Python API)
        Path(out).mkdir(parents=True, exist_ok=True)
        handle = open(Path(out) / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _held_locks[key] = handle
        except OSError:
            handle.close()
            busy = True
    if broadcast(busy):  # one error line, from rank 0
        raise SystemExit(2 if RANK else f"{out} is in use by another run (the same command started "
                         "twice?): wait for it to end, or use another --out")
    if RANK == 0:
        write_atomic(Path(out) / "args.json", json.dumps(asdict(args) | (extra or {}), indent=2))


# ---- Several processes (torchrun, accelerate launch): every rank computes, rank 0 writes ----
# this process's rank (from the launcher, for who prints) and the process count (init_distributed)
RANK, WORLD = int(os.environ.get("RANK", "0")), 1

def init_distributed(device: Optional[str], tiny=()) -> Optional[str]:
    """Join the process group when a launcher started several processes (WORLD_SIZE > 1): gloo on
    CPU, nccl with one GPU per rank (LOCAL_RANK); returns this rank's device. `tiny`: tiny-random
    models to build first (qwen3vl, sd3, kontext): in a group transformers saves on rank 0 alone."""
    global RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    for kind in tiny:
        tiny_dir(kind)
    import torch
    import torch.distributed as dist
    gpu = torch.cuda.is_available() and not str(device or "").startswith("cpu")
    if gpu:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    return device or "cpu"

def mine(i: int) -> bool:
    """Whether item i of a list shared out round-robin (i, i + N, ...) is this rank's."""
    return i % WORLD == RANK

def my_share(n: int) -> list:
    """This rank's indices among 0..n-1: r, r + N, r + 2N, ..."""
    return list(range(n))[RANK::WORLD]

def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if WORLD == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out

def broadcast(obj):
    """Rank 0's `obj`, on every rank."""
    return obj if WORLD == 1 else gather(obj)[0]

def sum_gradients(params) -> None:
    """p.grad <- its sum over ranks, in one all-reduce (a rank that computed nothing adds zeros)."""
    if WORLD == 1:
        return
    import torch
    import torch.distributed as dist
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


# ---- Files: text, JSONL records, images (atomic writes), prompt lists, parquet streams ----
def digest(*parts) -> str:
    """A short stable id from strings (pair ids, cache names)."""
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]

def warn(message: str) -> None:
    """`warning: message` on stderr, above any progress bar instead of inside it (rank 0 only)."""
    from tqdm import tqdm
    if RANK == 0:
        tqdm.write(f"warning: {message}", file=sys.stderr)

def read_text_file(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None

def write_atomic(path, text: str) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

@contextlib.contextmanager
def saving(path):
    """Around a library's save (torch.save, save_pretrained): its failure to write (RuntimeError or
    SafetensorError, on a full disk) becomes the OSError that `run` reports in one line."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        last = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
        raise OSError(None, f"could not write ({type(err).__name__}: {last})", str(path)) from None

def read_jsonl(path) -> list:
    """Records of a JSONL file; a torn last line (a killed write) is cut off, any other is named."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    records = []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n} is not a JSON record ({line[:60]!r}); the file was "
                             "damaged outside this program: fix or delete that line") from None
    return records

def append_jsonl(path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())

def read_image(path) -> tuple:
    """(RGB image, None) or (None, what is wrong) of a path or io.BytesIO; never raises."""
    if not isinstance(path, io.BytesIO) and not Path(path).is_file():
        return None, "a folder, not an image file" if Path(path).is_dir() else "missing"
    try:
        with Image.open(path) as im:
            return im.convert("RGB"), None
    except Image.DecompressionBombError as err:
        return None, f"too large to decode ({err})"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return None, f"corrupt or not an image ({type(err).__name__})"

def load_image(path) -> Optional[Image.Image]:
    """The RGB image at `path`, or None when it is missing or unreadable."""
    return read_image(path)[0]

def save_image_atomic(image: Image.Image, path) -> None:
    """Written under a temporary name, then renamed: a killed run leaves no truncated image."""
    tmp = Path(path).with_name(f".{Path(path).stem}.tmp{Path(path).suffix}")
    image.save(tmp)
    os.replace(tmp, path)

def save_embedded_image(cell, path) -> Optional[str]:
    """A parquet image cell ({"bytes": ...} or bytes) as an RGB PNG at `path` (a whole earlier copy
    is kept); returns what is wrong ('missing', 'corrupt ...') or None."""
    if load_image(path) is not None:
        return None
    raw = cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, bytes) else None
    if not raw:
        return "missing"
    image, problem = read_image(io.BytesIO(raw))
    if image is not None:
        save_image_atomic(image, path)
    return problem

def bound_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    w, h = image.size
    if w * h <= max_pixels:
        return image
    s = math.sqrt(max_pixels / (w * h))
    return image.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BICUBIC)

def read_prompt_records(path) -> list:
    """Records {"prompt", "_line", ...} from a .txt (a prompt a line; blanks, # comments skipped) or
    a .jsonl (a `prompt` field a line)."""
    path, records = Path(path), []
    require(path.is_file(), f"prompt file {path} not found (expected .txt, one prompt per line, or "
            ".jsonl with 'prompt')", FileNotFoundError)
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if path.suffix != ".jsonl":
            records.append({"prompt": line.strip(), "_line": n})
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") \
                from None
        ok = isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and rec["prompt"].strip()
        require(ok, f"{path}:{n}: expected a JSON object with a non-empty 'prompt' string, got "
                f"{line[:80]!r}", ValueError)
        src = rec.get("source_image")
        require(src is None or (isinstance(src, str) and src.strip()),
                f"{path}:{n}: 'source_image' must be a path (a string), got {src!r}", ValueError)
        records.append({**rec, "prompt": rec["prompt"].strip(), "_line": n})
    require(records, f"{path} holds no prompts", ValueError)
    return records

def dataset_download_hint(hub_id: str, local: str, flag: str, use: Optional[str] = None) -> str:
    return (f"On a machine with network run\n  hf download {hub_id} --repo-type dataset "
            f"--local-dir {local}\nand pass {flag} {use or local}.")

def open_parquet_stream(source: str, split: str, image_columns, config: Optional[str] = None,
                        hint: str = ""):
    """A `datasets` stream (a limit of N reads about N rows) over a hub dataset or local parquet,
    image columns undecoded (one corrupt image is a skip, not a crash)."""
    import datasets
    try:
        if Path(source).exists():
            files = sorted(map(str, Path(source).rglob("*.parquet"))) \
                if Path(source).is_dir() else [source]
            require(files, f"no .parquet files under {source}", FileNotFoundError)
            ds = datasets.load_dataset("parquet", data_files={split: files}, split=split,
                                       streaming=True)
        else:
            ds = datasets.load_dataset(source, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types for a missing repo/config/split/file
        raise ModelLoadError(f"could not open {source} ({config or 'default'}, split {split!r}): "
                             f"{type(err).__name__}: {str(err)[:300]}. {hint}".strip()) from None
    # a column the data lacks is left alone (cast_column would add it as all-None, hiding that)
    for c in image_columns:
        if ds.column_names is None or c in ds.column_names:
            ds = ds.cast_column(c, datasets.Image(decode=False))
    return ds


# ---- Model loading: hub id, local folder or tiny-random; hub errors -> the download command
GENERATORS = {"t2i": "stabilityai/stable-diffusion-3.5-medium",  # the default per task
              "edit": "black-forest-labs/FLUX.1-Kontext-dev"}
_NOT_QUANTIZED = ["model.visual", "lm_head"]  # kept in bf16 under 4/8-bit (module-name prefixes)

@contextlib.contextmanager
def quiet_loading():
    """No per-shard bars or info logs while a model already on disk is loaded or saved."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    levels = tlog.get_verbosity(), dlog.get_verbosity()
    for lib in (tlog, dlog):
        lib.disable_progress_bar(), lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib, level in zip((tlog, dlog), levels):
            lib.enable_progress_bar(), lib.set_verbosity(level)

def from_pretrained(load, name: str, what: str = "model", path: Optional[str] = None, **kwargs):
    """`load(path or name, **kwargs)`, a from_pretrained; a missing path, a folder without a model
    or the hub's error (offline, not found, no access): one ModelLoadError saying how to get it."""
    folder = Path(path or name).expanduser()  # a local folder (~ expanded), else a hub id
    local = folder.exists()
    path = str(folder) if local else path or name
    if not local and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
        raise ModelLoadError(f"{what} path '{name}' does not exist")
    try:
        with quiet_loading() if local else contextlib.nullcontext():
            return load(path, **kwargs)
    except (OSError, ValueError) as err:
        if local:
            raise ModelLoadError(f"'{path}' does not hold a loadable {what}: {err}") from err
        why, folder = (str(err).splitlines() or [""])[0][:200], f"models/{name.split('/')[-1]}"
        raise ModelLoadError(
            f"Could not load {what} '{name}': {type(err).__name__}: {why}.\nOn a machine with "
            f"network access run `hf download {name} --local-dir {folder}` and pass {folder} "
            "instead, or set HF_HOME to a cache that holds it. For an offline smoke run use "
            "tiny-random.") from None

def load_vlm(name: str, quantization: str = "auto", adapter: Optional[str] = None,
             device: Optional[str] = None, trainable: bool = False, dtype=None):
    """(model, processor) for a hub id, a local folder or `tiny-random`, quantized (auto: nf4 on a
    GPU; vision tower and lm_head kept), with a peft LoRA `adapter` (e.g. the PARROT student)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if quantization == "auto":
        quantization = "4bit" if device.startswith("cuda") else "none"
    kwargs = {"dtype": dtype}
    if quantization in ("4bit", "8bit"):
        kwargs.update(device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=_NOT_QUANTIZED))
    path = str(tiny_dir("qwen3vl")) if name == "tiny-random" else name
    processor = from_pretrained(AutoProcessor.from_pretrained, name, "model", path)
    model = from_pretrained(AutoModelForImageTextToText.from_pretrained, name, "model", path,
                            **kwargs)
    if quantization == "none":
        model.to(device)
    if adapter is not None:  # a peft LoRA folder (parrot.py's student/)
        from peft import PeftModel
        peft = lambda folder: PeftModel.from_pretrained(model, folder, is_trainable=trainable)
        model = from_pretrained(peft, adapter, "adapter")
    return model if trainable else model.eval(), processor

def load_generator(name: str, task: str = "t2i", device: Optional[str] = None,
                   no_t5: bool = False, quantization: str = "none"):
    """A diffusers pipeline (hub id, local folder or `tiny-random`: SD3 for t2i, Kontext for edit)
    on `device`; no_t5: without SD3's T5; "4bit": transformer and T5 in nf4 (needs a GPU)."""
    import torch
    from diffusers import DiffusionPipeline
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kwargs = {"dtype": dtype}
    if quantization == "4bit":
        require(device.startswith("cuda"), "4-bit generator quantization needs a CUDA GPU "
                "(diffusers' bitsandbytes quantizer refuses CPU); use none here", ModelLoadError)
        from diffusers import PipelineQuantizationConfig
        kwargs["quantization_config"] = PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit",  # T5 is text_encoder_2 in FLUX, _3 in SD3
            components_to_quantize=["transformer", "text_encoder_2", "text_encoder_3"],
            quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                          "bnb_4bit_compute_dtype": dtype})
    path = str(tiny_dir(TINY_KIND[task])) if name == "tiny-random" else name
    index = Path(path) / "model_index.json"  # a folder saved without SD3's T5: none loaded
    if no_t5 or (index.is_file() and "text_encoder_3" in index.read_text()
                 and not (index.parent / "text_encoder_3").is_dir()):
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    pipe = from_pretrained(DiffusionPipeline.from_pretrained, name, "generator", path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe if quantization == "4bit" else pipe.to(device)


# ---- tiny-random: the real architectures, randomly initialised, built offline from the configs and
# tokenizers in tiny/ (no weights; docs/REFERENCE.md: "What `tiny-random` is", "common.py")
TINY = PROMPTS_DIR.parent / "tiny"  # next to prompts/, in a checkout or an installation
TINY_KIND = {"t2i": "sd3", "edit": "kontext"}  # the tiny generator of each task
# the cache's version (bumped when a tiny model changes), and the tiny decoder's gain: pixel value
TINY_VERSION, TINY_DECODER_GAIN = 6, 0.15  # (0-1) per unit of a decoded latent channel

def build_tiny(kind: str, seed: int = 0) -> list:
    """The parts of tiny-random `kind` (qwen3vl; sd3 or kontext, ~0.3M parameters, 64x64): the
    real classes made from tiny/KIND, weights drawn from `seed` in the order the folders sort."""
    import importlib
    import torch
    import transformers
    folder = TINY / kind
    torch.manual_seed(seed)
    if kind == "qwen3vl":
        config = transformers.AutoConfig.from_pretrained(folder)
        model = transformers.AutoModelForImageTextToText.from_config(config).eval()
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
        return [model, transformers.AutoProcessor.from_pretrained(folder)]
    index, parts = json.loads((folder / "model_index.json").read_text()), {}
    for name, (library, cls) in sorted((k, v) for k, v in index.items() if k[0] != "_"):
        if library is None:  # a part the pipeline runs without (SD3's T5)
            parts[name] = None
            continue
        cls, path = getattr(importlib.import_module(library), cls), folder / name
        if name.startswith("tokenizer"):
            parts[name] = cls.from_pretrained(path)
        elif library == "transformers":
            parts[name] = cls(transformers.AutoConfig.from_pretrained(path)).eval()
        else:
            parts[name] = cls.from_config(cls.load_config(path))
    _tiny_decoder(parts["vae"])
    return [getattr(importlib.import_module("diffusers"), index["_class_name"])(**parts)]

def tiny_dir(kind: str, seed: int = 0) -> Path:
    """The folder of a saved tiny model, built on first use; atomic, so parallel runs are safe."""
    root = Path(os.environ.get("RATIONALREWARDS_CACHE", Path.home() / ".cache" / "rationalrewards"))
    path = root / f"tiny-random-{kind}-v{TINY_VERSION}-seed{seed}"
    if not any(path.glob("*.json")):
        if WORLD > 1:  # in a group transformers saves on rank 0 alone: a pipeline half-saved
            raise ModelLoadError(f"{kind} is not built yet and this process is in a group: build "
                                 "it before joining (init_distributed's `tiny`)")
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        with quiet_loading():
            for part in build_tiny(kind, seed):
                part.save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return path

def _tiny_decoder(vae) -> None:
    """The AutoencoderTiny's decoder set by hand to RGB = 0.5 + g 3 tanh(z[0:3] / 3) (g: the gain),
    so RL can visibly move the colour (a random AutoencoderKL's GroupNorm would undo it)."""
    import torch
    # the decoder's own convolutions (its blocks sit between them)
    first, *middle, last = [m for m in vae.decoder.layers if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for p in vae.decoder.parameters():  # all of them convolutions'
            p.zero_()  # every residual branch off: each block is then ReLU(x) = x
        for c in range(3):  # channel c through the centre taps, lifted by 3 to stay >= 0
            first.weight[c, c, 1, 1], first.bias[c] = 1.0, 3.0
            for m in middle:
                m.weight[c, c, 1, 1] = 1.0
            last.weight[c, c, 1, 1], last.bias[c] = TINY_DECODER_GAIN, 0.5 - 3 * TINY_DECODER_GAIN


# ---- Backends: generate(messages, ...) -> [Generation]; answer_logprobs -> [{answer: log p}]
@dataclass
class Generation:
    """One reply: its text, whether the token limit cut it, the error of a failed request."""
    text: str
    truncated: bool = False
    error: Optional[str] = None
    note: Optional[str] = None     # a demonstration teacher's record of what it did (ToyTeacher)

def generations(outs) -> list:
    """[Generation] from a backend's generate(), which may also return plain texts."""
    return [Generation(o) if isinstance(o, str) else o for o in outs]

class TransformersBackend:
    """In-process generation with real batching (left padding, KV cache)."""

    def __init__(self, model, processor, batch_size: int = 8, max_pixels: int = 768 * 768,
                 name: str = ""):
        self.model, self.processor, self.name = model, processor, name
        self.batch_size, self.max_pixels = batch_size, max_pixels
        # generation appends on the right and answer_logprobs reads the last position: left pads
        processor.tokenizer.padding_side = "left"

    def _inputs(self, convs):
        def bound(part):
            return {**part, "image": bound_pixels(part["image"], self.max_pixels)} \
                if part["type"] == "image" else part
        convs = [[{**t, "content": [bound(p) for p in t["content"]]}
                  if isinstance(t["content"], list) else t for t in conv] for conv in convs]
        return self.processor.apply_chat_template(
            convs, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True}).to(self.model.device)

    def generate(self, convs, max_new_tokens=2048, temperature=0.1, min_new_tokens=0) -> list:
        import torch
        eos = self.model.generation_config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []))
        outs = []
        for i in range(0, len(convs), self.batch_size):
            inputs = self._inputs(convs[i:i + self.batch_size])
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, top_p=None,
                                          min_new_tokens=min_new_tokens, top_k=None,
                                          do_sample=temperature > 0,
                                          temperature=temperature if temperature > 0 else None)
            new = out[:, inputs["input_ids"].shape[1]:]  # (B, T_new)
            ended = torch.isin(new.cpu(), eos).any(dim=1) if len(eos) else [False] * len(new)
            texts = self.processor.batch_decode(new, skip_special_tokens=True)
            outs += [Generation(t, truncated=not bool(e)) for t, e in zip(texts, ended)]
        return outs

    def answer_logprobs(self, convs, answers=("A", "B")) -> list:
        """Per conversation {answer: log P(its first token | prompt)}: a log-softmax over the whole
        vocabulary after the generation prompt, one forward pass, not normalised over `answers`."""
        import torch
        ids = [self.processor.tokenizer.encode(a, add_special_tokens=False)[0] for a in answers]
        results = []
        for i in range(0, len(convs), self.batch_size):
            inputs = self._inputs(convs[i:i + self.batch_size])
            with torch.no_grad():  # the last position's logits only: (B, 1, V), not (B, T, V)
                logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)[:, ids]  # (B, len(answers))
            results += [dict(zip(answers, row.tolist())) for row in logp]
        return results

class OpenAIBackend:
    """Chat completions over HTTP (vLLM, SGLang, APIs), `openai` client: images as data URLs,
    streamed replies (a server silent for `timeout` s, $RATIONALREWARDS_STALL_SECONDS or 60, is
    stalled: said, retried, then failed), each retry said, replies checked, top-k log-probs."""

    def __init__(self, api_base: str, model: str, max_concurrency: int = 8, max_pixels: int =
                 768 * 768, timeout: float = float(os.environ.get(
                     "RATIONALREWARDS_STALL_SECONDS", "60")), max_retries: int = 2):
        import openai
        self.url, self.name, self.max_pixels = api_base, model, max_pixels
        self.max_concurrency, self.timeout, self.max_retries = max_concurrency, timeout, max_retries
        # the client's own retries are silent; ours say each one (`_create`)
        self.client = openai.OpenAI(base_url=api_base, timeout=timeout, max_retries=0,
                                    api_key=os.environ.get("OPENAI_API_KEY") or "none")

    def _messages(self, conv) -> list:
        def part(p):
            if p["type"] != "image":
                return {"type": "text", "text": p["text"]}
            buf = io.BytesIO()
            bound_pixels(p["image"], self.max_pixels).save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            return {"type": "image_url", "image_url": {"url": url}}
        return [t if isinstance(t["content"], str) else
                {"role": t["role"], "content": [part(p) for p in t["content"]]} for t in conv]

    def _create(self, conv, stream: bool = False, **kw):
        """One request, retried on a stall, a dropped connection, a 5xx or 429, or a reply that is
        not JSON; streamed: (text, finish_reason), else the first choice. Fails: BackendError."""
        from openai import APIConnectionError, APIError, APIStatusError
        messages = self._messages(conv)
        for attempt in range(self.max_retries + 1):
            try:
                return self._once(messages, stream, **kw)
            except BackendError:
                raise  # an answer that is not a chat completion: the same request gets the same
            except Exception as err:  # the client's, or its HTTP library's while streaming
                name = type(err).__name__  # a ValueError is json's: a proxy, a dead worker
                why = (f"{name}: nothing received for {self.timeout:g} s (stalled?)" if "Timeout"
                       in name else f"the reply is not JSON ({err})" if isinstance(err, ValueError)
                       else f"{name}: {str(err)[:300]}")
                # not retried: a 4xx, or an error the server itself sent in its reply
                retry = err.status_code >= 500 or err.status_code == 429 \
                    if isinstance(err, APIStatusError) else \
                    isinstance(err, APIConnectionError) or not isinstance(err, APIError)
                if not retry or attempt == self.max_retries:
                    raise BackendError(f"chat-completions request to {self.url} failed: {why}") \
                        from None
                warn(f"{self.url}: {why}; retry {attempt + 1} of {self.max_retries}")
                time.sleep(min(8.0, 0.5 * 2 ** attempt))

    def _once(self, messages, stream: bool, **kw):
        resp = self.client.chat.completions.create(model=self.name, stream=stream,
                                                   messages=messages, **kw)
        if not stream:
            return self._choice(resp)
        text, finish = [], None
        with resp:
            if "event-stream" not in resp.response.headers.get("content-type", ""):
                # no stream but one body: a server that ignores `stream`, or a proxy's reply
                body = json.loads(resp.response.read())  # ValueError when it is not JSON
                try:
                    choice = body["choices"][0]
                    return choice["message"]["content"] or "", choice.get("finish_reason")
                except (KeyError, IndexError, TypeError):
                    raise BackendError(f"{self.url} answered with something that is not a chat "
                                       f"completion: {str(body)[:300]}") from None
            for chunk in resp:
                if getattr(chunk, "choices", None) == []:
                    continue  # a chunk that carries usage only
                choice = self._choice(chunk, "delta")
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return "".join(text), finish

    def _choice(self, resp, part: str = "message"):
        """The first choice (the chunk's choices when streamed), checked: the client does not."""
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices or getattr(choices[0], part, None) is None:
            raise BackendError(f"{self.url} answered with something that is not a chat "
                               f"completion: {str(resp)[:300]}")
        return choices[0]

    def _map(self, fn, items) -> list:
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            return list(pool.map(fn, items))
        finally:  # on Ctrl-C, do not wait for requests in flight
            pool.shutdown(wait=False, cancel_futures=True)

    def generate(self, convs, max_new_tokens=2048, temperature=0.1, min_new_tokens=0) -> list:
        """[Generation]; a failed request is one with its error (the caller decides what stops)."""
        def one(conv):
            try:
                text, finish = self._create(conv, stream=True, max_tokens=max_new_tokens,
                                            temperature=temperature)
            except BackendError as err:
                return Generation("", error=str(err))
            if not text.strip():
                warn(f"{self.url} returned no text content ({text[:80]!r})")
            return Generation(text, truncated=finish == "length")
        return self._map(one, convs)

    def answer_logprobs(self, convs, answers=("A", "B")) -> list:
        """Per conversation {answer: its first token's logprob in the server's top-20 list, None
        when not listed}, plus "min_listed", the smallest logprob listed (an unlisted answer has at
        most that); not normalised. A server without logprobs, or a list naming no answer: the
        answer named in the text gets 0.0, the others -inf; none named: None, never a guess."""
        def one(conv):
            choice = self._create(conv, max_tokens=1, temperature=0.0, logprobs=True,
                                  top_logprobs=20)
            content = getattr(choice.logprobs, "content", None) or []
            top = [(str(e.token).strip(), float(e.logprob))
                   for e in (content[0].top_logprobs or [] if content else [])]
            found = dict(reversed(top))  # a token listed twice keeps its first (highest) entry
            if any(a in found for a in answers):
                return {**{a: found.get(a) for a in answers},
                        "min_listed": min(lp for _, lp in top)}
            text = choice.message.content or ""
            m = re.search(r"\b(" + "|".join(map(re.escape, answers)) + r")\b", text)
            if not m:
                warn(f"teacher answer not readable as one of {answers}: {text[:80]!r}")
                return None
            return {a: (0.0 if a == m.group(1) else -math.inf) for a in answers}
        return self._map(one, convs)

class ToyCritic:
    """A demonstration critic, NOT a reward model: `toy-redness`'s rubric-format critiques score
    clip(2.5 + 6 (mean R - mean B) / 255, 1, 4) for the judged (last) image, text rendering N/A
    (`toy-blueness`: the opposite sign), so a working RL run visibly makes images redder."""

    def __init__(self, name: str):
        if name not in ("toy-redness", "toy-blueness"):
            raise ModelLoadError(f"unknown toy critic {name!r}: toy-redness or toy-blueness")
        self.name, self.colour, self.sign = name, name[4:-4], 1 if name == "toy-redness" else -1

    def generate(self, convs, *args, **kwargs) -> list:
        outs = []
        for conv in convs:
            images = ToyTeacher._read(conv)[1]
            red, _, blue = ImageStat.Stat(images[-1].convert("RGB")).mean
            s = min(4.0, max(1.0, 2.5 + self.sign * 6 * (red - blue) / 255))
            titles = ["Text Faithfulness", "Image Faithfulness"][:len(images)]  # edit: 2 images
            titles += ["Physical and Visual Quality"]
            text = "".join(f"{n}. {title}\n## Justification: mean R - mean B is {red - blue:.1f}."
                           f"\n## Score: {s:.3f}\n" for n, title in enumerate(titles, 1))
            outs.append(Generation(text + f"{len(titles) + 1}. Text Rendering\n## Justification: "
                                   f"no text.\n## Score: N/A\n# Summary: a toy critique.\n## "
                                   f"Refined Request: the same picture, more {self.colour}"))
        return outs

def load_backend(model: str, api_base: Optional[str] = None, adapter: Optional[str] = None,
                 quantization: str = "auto", batch_size: int = 8, max_pixels: int = 768 * 768,
                 device: Optional[str] = None):
    """`model` served at `api_base`, loaded in-process, or a toy critic (toy-redness/-blueness)."""
    if model.startswith("toy-") and not api_base:
        return ToyCritic(model)
    if api_base:
        require(not adapter, "--scorer-adapter applies to a local model; serve the adapter with "
                "your server instead (vLLM: --lora-modules)", ValueError)
        return OpenAIBackend(api_base, model, max_concurrency=batch_size, max_pixels=max_pixels)
    vlm, processor = load_vlm(model, quantization, adapter, device=device)
    return TransformersBackend(vlm, processor, batch_size, max_pixels, name=model)


# ---- The toy world of "Watch PARROT work": a teacher whose mistakes are known, and its eyes. A
# simulation, not the paper: parrot.py runs it like any teacher; the demo pairs are parrot.py's.
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
           "yellow": (235, 200, 30), "purple": (135, 60, 175), "orange": (240, 135, 30)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
TOY_FAILURES = ("hallucination", "label_ignoring", "vague")  # the paper's App. F teacher failures
TOY_TITLES = dict(text_faithfulness="Text Faithfulness", physical_quality="Physical and Visual "
                  "Quality", text_rendering="Text Rendering")

def toy_look(image: Image.Image, request: str) -> dict:
    """What the toy sees: text faithfulness (the asked colour commonest among coloured pixels, its
    shapes counted along the middle row), physical quality (the mean step between neighbouring
    pixels), text rendering None (no letters read: its blind spot) or N/A; seen, asked: in words."""
    import numpy as np
    px = np.asarray(image.convert("RGB").resize((128, 128)).filter(ImageFilter.MedianFilter(5)),
                    dtype=float)                                                    # (H, W, 3)
    coloured = px.max(-1) - px.min(-1) > 60                                         # (H, W)
    names, rgb = list(COLOURS), np.array(list(COLOURS.values()), dtype=float)
    nearest = np.argmin(((px[..., None, :] - rgb) ** 2).sum(-1), axis=-1)           # (H, W)
    asked = next((names.index(c) for c in names if re.search(rf"\b{c}\b", request)), -1)
    votes = np.bincount(nearest[coloured], minlength=len(names))                     # (colours,)
    runs = lambda c: int((np.diff(np.concatenate([[0], coloured[64] & (nearest[64] == c), [0]])
                                  .astype(int)) == 1).sum())  # runs of colour c, middle row
    right, shapes = coloured.any() and votes.argmax() == asked, runs(asked)
    count = next((n for n, w in NUMBER_WORDS.items() if re.search(rf"\b{w}\b", request)), None)
    faithful = 1.5 if not right else 2.0 if count and count != shapes else 4.0
    noise = np.abs(np.diff(np.asarray(image.convert("L").resize((128, 128)), float), axis=1)).mean()
    say = lambda c, n: " ".join(([NUMBER_WORDS.get(n, str(n))] if count else []) + [names[c]]) \
        if c >= 0 else "no colour"
    main = int(votes.argmax()) if coloured.any() else -1
    return {"text_faithfulness": faithful, "physical_quality": 4.0 if noise < 6 else 1.5,
            "text_rendering": None if '"' in request else "N/A", "asked": say(asked, count),
            "seen": say(main, runs(main))}

class ToyTeacher:
    """A demonstration teacher, NOT a VLM (`--teacher toy`; README "Watch PARROT work"). Phase 1:
    `toy_rationale`, a failure of App. F at the seeded rate `failure_rate` (named in `note`);
    Phase 2: `toy_check`; Phase 3: `toy_pointwise`. It sees the demo pairs through `toy_look`."""

    def __init__(self, failure_rate: float = 0.3):
        self.name, self.failure_rate, self.seen = "toy", failure_rate, {}

    def look(self, image: Image.Image, request: str) -> dict:  # Phases 1, 2: the same images
        key = (hashlib.sha1(image.tobytes()).digest(), image.size, request)
        return self.seen.get(key) or self.seen.setdefault(key, toy_look(image, request))

    @staticmethod
    def _read(conv) -> tuple:
        parts = [p for t in conv if isinstance(t["content"], list) for p in t["content"]]
        text = "\n".join(p["text"] for p in parts if p["type"] == "text")
        request = (re.search(r"User Instruction:\s*(.*)", text) or re.search(r"(.*)", text))[1]
        return text, [p["image"] for p in parts if p["type"] == "image"], request

    def generate(self, convs, *args, **kwargs) -> list:
        import torch  # parrot seeds torch per batch: a resumed run fails where the first did
        outs = []
        for text, images, request in map(self._read, convs):
            label = re.search(r"Human Preference:\s*Image ([AB])", text)
            draw = float(torch.rand(())) if label else 1.0
            kind = TOY_FAILURES[min(2, int(3 * draw / self.failure_rate))] \
                if draw < self.failure_rate else "none"
            outs.append(Generation(toy_rationale(*(self.look(im, request) for im in images[-2:]),
                                                 label[1], kind), note=kind) if label else
                        Generation(toy_pointwise(text, request)))  # a projection
        return outs

    def answer_logprobs(self, convs, answers=("A", "B")) -> list:
        """{A: log P(A | x, z), B: ...}, both from toy_check's log-odds."""
        out = []
        for text, images, request in map(self._read, convs):
            logit = toy_check(text.split("### Judgement to Check", 1)[-1],
                              *(self.look(im, request) for im in images[-2:]))
            out.append({"A": -math.log1p(math.exp(-logit)), "B": -math.log1p(math.exp(logit))})
        return out

def toy_rationale(a: dict, b: dict, label: str, kind: str) -> str:
    """Phase 1, in its format, from what the toy sees in A and B, for the label: its scores where
    they agree, swapped where not; the blind spot: a vague 0.3. Failures: hallucination (a defect
    claimed where none is seen, the real one unsaid), vague (every gap 0.3), label-ignoring."""
    good, bad = (a, b) if label == "A" else (b, a)
    gaps = {d: good[d] - bad[d] if isinstance(good[d], float) else 0.0 for d in TOY_TITLES}
    claim = {d: (good[d], bad[d])[::-1 if gaps[d] < 0 else 1] if isinstance(good[d], float)
             else (3.0, 3.0) for d in TOY_TITLES}  # letters it cannot read: an even, vague 3
    if not any(gaps.values()):
        claim["text_rendering" if good["text_rendering"] is None else "physical_quality"] = (3.3, 3)
    if kind == "hallucination":
        claim = {d: (4.0, 4.0) for d in TOY_TITLES}
        claim[min(("physical_quality", "text_faithfulness"), key=lambda d: abs(gaps[d]))] = 3.8, 1.5
    elif kind != "none":
        claim = {d: (3.3, 3.0) if kind == "vague" else s[::-1] for d, s in claim.items()}
    lines = ["# User Request Analysis", f"The request asks for {a['asked']}.",
             "# Detailed Judgement"]
    for n, (d, (g, r)) in enumerate(claim.items(), 1):
        sa, sb = ("N/A", "N/A") if a[d] == "N/A" else (g, r) if label == "A" else (r, g)
        win = "N/A" if sa == "N/A" else "It's a tie" if sa == sb else f"Image {'AB'[sa < sb]}"
        how = "clearly" if isinstance(sa, float) and abs(sa - sb) >= 0.5 else "perhaps slightly"
        why = f"{win} is {how} better here." if win.startswith("Image") else "No difference."
        if d == "text_faithfulness" and kind != "vague":  # its evidence, then its verdict
            saw = lambda x: f"{x['seen']}, {'as' if x[d] == 4.0 else 'not as'} asked"
            why = f"A shows {saw(a)}; B shows {saw(b)}. {why}"
        lines += [f"{n}. {TOY_TITLES[d]}:", f"## Justification: {why}",
                  f"## Score A: {sa}", f"## Score B: {sb}", f"## Winner: {win}"]
    return "\n".join(lines + ["# Summary: a toy judgement from pixel statistics."])

def toy_check(z: str, a: dict, b: dict, k: float = 2.0, doubt: float = 0.25) -> float:
    """The toy's log P(A|x,z) - log P(B|x,z): each gap g = score A - score B that z claims, against
    the gap o it sees: verified (|g|, |o| >= 0.5, same sign) +k g; contradicted (|g| >= 0.5, o
    absent or opposite) -k g; uncommitted or unseeable -doubt g (unsupported claims cost trust)."""
    logit = 0.0
    for d, title in TOY_TITLES.items():
        m = re.search(rf"{title}:.*?Score A:\s*([\d.]+).*?Score B:\s*([\d.]+)", z, re.S)
        g = float(m[1]) - float(m[2]) if m else 0.0  # a dimension z does not score: no gap
        o = a[d] - b[d] if isinstance(a[d], float) and isinstance(b[d], float) else None
        committed = abs(g) >= 0.5 and o is not None  # a claim it can check
        weight = (k if o * g > 0 and abs(o) >= 0.5 else -k) if committed else -doubt
        logit += weight * g
    return logit

def toy_pointwise(text: str, request: str) -> str:
    """A projection: the anchor scores ("- Title: score" lines) as a pointwise critique."""
    lines = []
    for n, (d, title) in enumerate(TOY_TITLES.items(), 1):
        m = re.search(rf"^- {title}: (\S+)$", text, re.M)
        lines += [f"{n}. {title}", "## Justification: as in the comparison.",
                  f"## Score: {m[1] if m else 'N/A'}"]
    return "\n".join(lines + ["# Summary: a toy critique.", "# User Request Refinement:",
                              "## Refinement Comments: none.", f"## Refined Request: {request}"])


# ---- Pictures: every grid of captioned images (caption_grid) and the RL reward curve ----
def wrap_text(text: str, width: int) -> list:
    """Lines of at most `width` characters, broken between words."""
    return textwrap.wrap(" ".join((text or "").split()), width, break_long_words=False,
                         break_on_hyphens=False)

def caption_grid(cells: list, path, title: str = "", side: int = 256, lines: int = 10,
                 columns: Optional[int] = None) -> Image.Image:
    """One picture of `cells`, each ([images side by side], [caption lines]), `columns` cells a row
    (default: one row), the title on top, written atomically to `path`."""
    columns = columns or len(cells)
    cell_w = max(len(ims) for ims, _ in cells) * (side + 6)
    head, text_h, rows = 24 if title else 0, 14 * lines + 8, math.ceil(len(cells) / columns)
    grid = Image.new("RGB", (columns * cell_w, head + rows * (side + text_h)), "white")
    draw, small = ImageDraw.Draw(grid), ImageFont.load_default(size=11)
    draw.text((4, 5), title, fill="black", font=ImageFont.load_default(size=13))
    for n, (images, caption) in enumerate(cells):
        x, y = (n % columns) * cell_w, head + (n // columns) * (side + text_h)
        for k, im in enumerate(images):  # longer side `side`, small ones scaled up pixel-sharp
            method = Image.NEAREST if max(im.size) < side else Image.BICUBIC
            grid.paste(ImageOps.contain(im, (side, side), method), (x + k * (side + 6), y))
        for j, line in enumerate(caption[:lines]):
            draw.text((x + 3, y + side + 3 + 14 * j), line, fill="black", font=small)
    save_image_atomic(grid, path)
    return grid

def plot_reward_curve(rows: list, path: Path, dims: tuple, title: str = "") -> list:
    """R and each dimension's mean score mapped to [0, 1], per epoch (matplotlib); a dimension with
    no readable score is named in the legend. Returns the legend's labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["reward_mean"] for r in rows], "o-", color="black", label="reward R")
    for d in dims:
        vals = [None if r.get(d) is None else (r[d] - 1) / 3 for r in rows]
        label = d.replace("_", " ") + ("" if any(v is not None for v in vals)
                                       else " (no readable score)")
        ax.plot(epochs, [float("nan") if v is None else v for v in vals], "o-", label=label)
    ax.set(title=f"{title}: reward per epoch" if title else "reward per epoch", xlabel="epoch",
           ylabel="R, and (s - 1) / 3 per dimension", ylim=(-0.02, 1.02))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # whole epochs
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [t.get_text() for t in ax.get_legend().get_texts()]
