"""The demo's device and its precision: which device, where the compute runs in bf16, the step's peak
GPU memory, and an out-of-memory error that names the phase that ran out and its knobs.

The weights and AdamW stay in fp32 (AdamW at lr 1e-6 needs them: bf16 would round most updates
away); the compute runs in bf16 under autocast where --dtype says so: `auto` (the default) on any
CUDA device (`cuda`, `cuda:1`, a torch.device) and fp32 on a CPU; `bf16` on any device, a CPU
included (the 0.5B's whole step ran 1.8x faster than in fp32 on a CPU with bf16 instructions:
docs/demo.md); `fp32` nowhere.
"""

import contextlib

import torch


def device_problem(device: str) -> str | None:
    """What is wrong with --device, in one line, or None: a name that is no device, a device this
    demo does not run on, or a GPU this torch cannot see. Nothing is loaded."""
    if device == "auto":
        return None if torch.cuda.is_available() else NO_GPU
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"--device {device}: not a device; use cpu, cuda, cuda:N or auto"
    if parsed.type not in ("cpu", "cuda"):
        return f"--device {device}: this demo runs on cpu or cuda (cuda:N)"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"--device {device}: this torch ({torch.__version__}, {build}) sees no CUDA GPU; --device cpu runs on the CPU"
    count = torch.cuda.device_count() if parsed.type == "cuda" else 0
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= count:
        return f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


NO_GPU = ("no CUDA GPU found: this demo is meant for one GPU. Pass --device cpu to run on the CPU anyway (README: "
          "a CPU run), or --smoke for the offline check.")


def pick_device(device: str) -> str:
    """--device: as given, or for "auto" the GPU (the CPU only when asked: it is very slow)."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    raise SystemExit(NO_GPU)


def on_gpu(device) -> bool:
    """Whether `device` ("cuda", "cuda:1", a torch.device) is a CUDA GPU."""
    return torch.device(device).type == "cuda"


DTYPES = ("auto", "bf16", "fp32")


def computes_in_bf16(device, dtype: str = "auto") -> bool:
    """--dtype: bf16 compute on `device`? auto: on a CUDA GPU yes, on a CPU no."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype == "bf16" or (dtype == "auto" and on_gpu(device))


def autocast(device, dtype: str = "auto"):
    """bf16 compute with fp32 weights where `computes_in_bf16`, else plain fp32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=computes_in_bf16(device, dtype))


def precision_note(device, dtype: str) -> str | None:
    """A line to print when --dtype bf16 runs on a CPU without bf16 instructions (AVX512-BF16; AMX
    CPUs have it too): there bf16 is emulated and need not be faster than fp32."""
    if on_gpu(device) or not computes_in_bf16(device, dtype):
        return None
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private in torch, hence the fallback
    if check is not None and check():
        return None
    return "note: this CPU reports no bf16 instructions (AVX512-BF16): --dtype bf16 may be no faster than fp32 here"


def peak_memory(device) -> dict:
    """The step's peak GPU memory in GB (allocated by tensors, reserved by the allocator), then reset."""
    if not on_gpu(device):
        return {}
    peaks = {"gpu_max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
             "gpu_max_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    torch.cuda.reset_peak_memory_stats(device)
    return peaks


OUT_OF_MEMORY = {  # the phase that ran out of GPU memory -> the knobs that need less of it
    "sampling": "lower --sample-batch-size, or a smaller tree (--branch, --depth, --segment-tokens)",
    "the loss": "lower --max-row-tokens, add --gradient-checkpointing, or --kl-coef 0 (no reference copy)",
    "evaluation": "lower --eval-batch-size",
    "the optimizer step": "train LoRA adapters (--lora-rank 16): AdamW keeps two fp32 numbers per trained weight"}


@contextlib.contextmanager
def phase(name: str):
    """Name the phase in a one-line message, with its knobs, if it runs out of GPU memory."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        raise SystemExit(f"out of GPU memory in {name}: {OUT_OF_MEMORY[name]}. ({str(error).splitlines()[0]})")
