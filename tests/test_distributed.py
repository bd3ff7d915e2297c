"""train_gsm8k.py under torchrun: two CPU processes (gloo) take the same update as one process, and
a two-process run stopped mid-way resumes to the records of one never stopped. Tiny models."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing

import train_gsm8k
from demo import distributed, models
from offline.tiny import byte_tokenizer, tiny_model
from treerpo import backward_loss, counted_tokens, leaves, sample_trees

ROOT = Path(__file__).parent.parent
FLAGS = ["--smoke", "--kl-coef", "0.01", "--max-row-tokens", "24", "--lr", "1e-2", "--out", "unused"]


def scored_trees() -> list:
    """Five trees of unequal sizes (EOS ends some paths early), rewards set, advantages not: the
    first tree's leaves all equal (fully pruned), so its process has less to train."""
    tokenizer = byte_tokenizer()
    model = tiny_model(len(tokenizer), init_std=0.2, seed=3)
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
        model.lm_head.bias[tokenizer.eos_token_id] = 2.0
    torch.manual_seed(0)
    prompts = [f"Question {n}: " + "x" * (3 * n) for n in range(5)]
    roots = sample_trees(model, tokenizer, prompts, branch=3, depth=2, segment_tokens=4, temperature=1.0)
    for number, root in enumerate(roots):
        for index, leaf in enumerate(leaves(root)):
            leaf.reward = 0.0 if number == 0 else float((index * (number + 1)) % 3 == 0)
    assert len({len(leaves(root)) for root in roots}) > 1  # unequal trees
    return roots


def one_update(method: str, roots: list) -> tuple[list, list, dict]:
    """The demo's update as its loop runs it, from the same starting model: credit over every tree, the
    loss over this process's share divided by the batch's count, the gradients summed, one AdamW step.
    Returns (the gradient AdamW stepped with, the weights after, the summed figures)."""
    cfg = train_gsm8k.parse_args(FLAGS + ["--method", method])
    model, _ = models.load(cfg)
    reference = models.reference_model(cfg, model, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    trees = train_gsm8k.credit(roots, cfg)
    loss, stats = backward_loss(model, distributed.share(trees), ref_model=reference, kl_coef=cfg.kl_coef,
                                temperature=cfg.temperature, max_row_tokens=cfg.max_row_tokens,
                                total_tokens=counted_tokens(trees))
    distributed.sum_gradients(model.parameters())
    mine = {"loss": loss, "abs_advantage": stats["mean_abs_advantage"] * stats["kept_nodes"]}  # as the loop
    stats |= distributed.sum_numbers(mine | {key: stats[key] for key in train_gsm8k.SUMMED}, "cpu")
    stats["mean_abs_advantage"] = stats.pop("abs_advantage") / max(stats["kept_nodes"], 1)
    gradient = [parameter.grad.clone() for parameter in model.parameters()]
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
    optimizer.step()
    return gradient, [parameter.detach().clone() for parameter in model.parameters()], stats


def worker(rank: int, world: int, port: int, folder: str, method: str, roots: list):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.start("cpu")
    try:
        gradient, weights, record = one_update(method, roots)
        torch.save({"gradient": gradient, "weights": weights, "record": record}, Path(folder) / f"rank{rank}.pt")
    finally:
        distributed.finish()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("method", ["treerpo", "treepo"])
def test_two_processes_take_the_one_process_update(tmp_path, method):
    """Process r trains trees r, r + 2, ...; after one AdamW step both hold the weights one process
    gets from all five trees (TreePO's whitening over the whole batch included), and the loss, tokens,
    kept nodes, KL and mean |advantage| are the whole batch's."""
    roots = scored_trees()
    expected_gradient, expected_weights, expected = one_update(method, roots)
    torch.multiprocessing.start_processes(worker, args=(2, free_port(), str(tmp_path), method, roots), nprocs=2,
                                          start_method="spawn")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for mine, theirs in zip(result["gradient"], expected_gradient):
            torch.testing.assert_close(mine, theirs, atol=1e-7, rtol=1e-4)  # summed in another order
        for mine, theirs in zip(result["weights"], expected_weights):  # AdamW's first step is lr x g / (|g| + eps):
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)  # where |g| ~ 1e-8, last bits show at 1% of lr
        for key in ("loss", "kl", "grad_norm", "clip_fraction", "mean_abs_advantage"):
            assert result["record"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
        for key in ("tokens", "kept_nodes", "pruned_nodes", "positions", "forwards", "logit_positions"):
            assert result["record"][key] == expected[key], key
    assert expected["tokens"] > 0 and expected["forwards"] > 2


def torchrun(*flags, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train_gsm8k.py", "--smoke", "--eval-size", "4", "--show-tree-every", "0", *flags]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def records(out: Path) -> list:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if not key.endswith("_s")} for line in lines]


def test_a_stopped_two_process_run_resumes_to_the_uninterrupted_records(tmp_path):
    straight = tmp_path / "straight"
    finished = torchrun("--steps", "10", "--out", str(straight))
    out, err = finished.communicate(timeout=600)
    assert finished.returncode == 0, err[-2000:]
    assert "done: steps 1-10" in out and out.count("done:") == 1  # process 0 alone speaks

    stopped = tmp_path / "stopped"
    run = torchrun("--steps", "10", "--out", str(stopped), start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (stopped / "metrics.jsonl").exists() or \
            len((stopped / "metrics.jsonl").read_text().splitlines()) < 3:  # step 0 and two steps logged
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGTERM)  # as a scheduler stops a job: every process gets it
    out, err = run.communicate(timeout=300)
    (line,) = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert "Resume with: OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 train_gsm8k.py" in line
    assert len(records(stopped)) < 11

    resumed = torchrun("--steps", "10", "--out", str(stopped), "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert records(stopped) == records(straight)


def test_a_resume_with_another_process_count_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train_gsm8k.main(["--smoke", "--steps", "2", "--eval-size", "2", "--out", str(out)])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        train_gsm8k.main(["--smoke", "--steps", "4", "--resume", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "ran in 1 process(es), this is 2: resume it with as many" in capsys.readouterr().err
