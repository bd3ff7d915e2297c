"""Past one GPU, under torchrun: question i of a step goes to process i mod P; the trees are gathered, so
every process computes the same advantages and divides its share's loss by the batch's token count; the
gradients are summed, so every process takes one process's AdamW step. Process 0 owns the run folder.
Without torchrun each function is the identity."""

import os

import torch
import torch.distributed as dist


def start(device: str) -> tuple[int, int, str]:
    """(this process's rank, the number of processes, its device): joins torchrun's group, if any."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if torch.device(device).type == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def processes() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def share(items: list) -> list:
    """This process's share of a global list: items rank, rank + P, rank + 2P, ..."""
    return items[dist.get_rank()::dist.get_world_size()] if dist.is_initialized() else list(items)


def gather(items: list) -> list:
    """Every process's `share`, back in the global order."""
    if not dist.is_initialized():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [part[index] for index in range(max(map(len, parts))) for part in parts if index < len(part)]


def sum_gradients(parameters: list):
    """Sum every process's gradients (each already divided by the global count)."""
    for parameter in parameters if dist.is_initialized() else []:
        if parameter.grad is None:  # a process that trained nothing adds zeros
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)


def sum_numbers(numbers: dict, device) -> dict:
    """Each number of `numbers` summed over the processes."""
    if not dist.is_initialized():
        return numbers
    values = torch.tensor([float(value) for value in numbers.values()], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(numbers, values.tolist()))


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()
