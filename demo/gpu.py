"""The demo on a GPU: which device, bf16 compute, the step's peak memory, and an out-of-memory
error that names the phase that ran out and the knobs for it (used by train_gsm8k.py).

The weights and AdamW stay in fp32 (AdamW at lr 1e-6 needs them: bf16 would round most updates
away); the compute runs in bf16 under autocast on any CUDA device (`cuda`, `cuda:1`, a
torch.device). Elsewhere everything is fp32.
"""

import contextlib

import torch


def pick_device(device: str) -> str:
    """--device: as given, or for "auto" the GPU (the CPU only when asked: it is very slow)."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    raise SystemExit("no CUDA GPU found: this demo is meant for one GPU. Pass --device cpu to run on the CPU "
                     "anyway (README: a CPU run), or --smoke for the offline check.")


def on_gpu(device) -> bool:
    """Whether `device` ("cuda", "cuda:1", a torch.device) is a CUDA GPU: bf16 compute there."""
    return torch.device(device).type == "cuda"


def autocast(device):
    """bf16 compute (fp32 weights) on any CUDA device, plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu(device))


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
