"""The demo past one GPU: data-parallel under torchrun, with the same update as one process.

    torchrun --standalone --nproc_per_node 4 train_gsm8k.py ...     # 4 GPUs of one node (NCCL)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 train_gsm8k.py ...   # two nodes
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 train_gsm8k.py --smoke   # CPU processes (gloo)

--prompts-per-step stays the global batch. Question i of a step goes to process i mod P (a fixed
assignment, so a resumed run sees the same ones); each process samples and scores its share. The
scored trees are gathered, so every process computes the same advantages (TreePO's whitening over
the whole batch included) and the same count of trained tokens; each trains its own trees, the
loss divided by that global count, and the gradients are summed once, after its own forwards:
processes do different numbers of forwards (some have nothing to train), so nothing collective
happens between them. Every process then takes the same AdamW step. Process 0 owns the run folder.
Without torchrun every function here is the one-process identity.
"""

import os

import torch
import torch.distributed as dist


def start(device: str) -> tuple[int, int, str]:
    """(this process's rank, the number of processes, its device). Under torchrun: joins the process
    group, NCCL on GPUs (device cuda:LOCAL_RANK), gloo on CPUs; else (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def processes() -> int:
    """How many processes run (torchrun's WORLD_SIZE; 1 without it): readable before `start`."""
    return int(os.environ.get("WORLD_SIZE", 1))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def finish():
    if active():
        dist.destroy_process_group()


def gather(items: list) -> list:
    """Every process's `items` in the global order, where process r held items r, r + P, r + 2P, ...
    (as `share` hands them out)."""
    if not active():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [part[index] for index in range(max(map(len, parts))) for part in parts if index < len(part)]


def share(items: list, rank: int, world: int) -> list:
    """This process's share of a global list: items rank, rank + world, ..."""
    return items[rank::world]


def sum_gradients(parameters: list):
    """Sum the gradients of every process (each part already divided by the global count). A
    process that trained nothing adds zeros."""
    if not active():
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)


def sum_numbers(numbers: dict, device) -> dict:
    """The sum over processes of each number in `numbers` (float64 on `device`)."""
    if not active():
        return numbers
    values = torch.tensor([float(value) for value in numbers.values()], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(numbers, values.tolist()))


SUMMED = ("tokens", "kept_nodes", "pruned_nodes", "positions", "forwards", "logit_positions", "kl", "clip_fraction")


def sum_loss_stats(loss: float, stats: dict, device) -> tuple[float, dict]:
    """backward_loss's loss and stats over every process: sums (the loss, kl and clip_fraction are
    already each process's share of the batch's mean), and the mean |A| over every kept node."""
    if not active():
        return loss, stats
    numbers = sum_numbers({"loss": loss, "abs_advantage": stats["mean_abs_advantage"] * stats["kept_nodes"],
                           **{key: stats[key] for key in SUMMED}}, device)
    mean_abs_advantage = numbers.pop("abs_advantage") / max(numbers["kept_nodes"], 1)
    return numbers.pop("loss"), stats | numbers | {"mean_abs_advantage": mean_abs_advantage}


def anyone(flag: bool, device) -> bool:
    """Whether any process says yes: a stop is taken after the same step by every process."""
    return bool(sum_numbers({"flag": bool(flag)}, device)["flag"]) if active() else bool(flag)


def barrier():
    if active():
        dist.barrier()
