"""A training run never loses work and never resumes wrong: faults injected into train_gsm8k.py's
--smoke run, in this process (tiny model, CPU, seconds each). Run: python -m pytest -q tests/test_runs.py"""

import copy
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import train_gsm8k
from demo import checkpoints, models, stops
from offline.tiny import byte_tokenizer
from treerpo import assign_advantages, backward_loss, leaves, response_tokens, sample_trees

SMOKE = ["--smoke", "--eval-size", "2", "--eval-every", "2", "--save-every", "2", "--show-tree-every", "0",
         "--save-trees"]


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """The printed commands repeat OMP_NUM_THREADS and CUDA_VISIBLE_DEVICES where set: unset here."""
    for name in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


def run(out, *flags):
    """train_gsm8k.main as `python train_gsm8k.py --smoke ... --out OUT FLAGS` runs it: its exit status
    (0, a number, or the message SystemExit printed)."""
    try:
        train_gsm8k.main([*SMOKE, "--out", str(out), *flags])
    except SystemExit as exit:
        return exit.code
    return 0


def records(out):
    """metrics.jsonl without the timings, which differ from run to run."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if not key.endswith("_s")} for line in lines]


def one_line(message):
    assert isinstance(message, str) and "\n" not in message.strip() and "Traceback" not in message, message
    return message


def command_after(text: str, words: str) -> list[str]:
    """The flags of the `python train_gsm8k.py ...` command that follows `words`, after --smoke's and --out's."""
    line = next(line for line in text.splitlines() if words in line)
    return shlex.split(line.split(f"{words} ")[1].split("python train_gsm8k.py ")[1])[len(SMOKE) + 2:]


@pytest.fixture(scope="module")
def straight_out(tmp_path_factory):
    """An uninterrupted 6-step run: what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run(out, "--steps", "6") == 0
    return out


@pytest.fixture(scope="module")
def straight(straight_out):
    result = records(straight_out)
    assert [record["step"] for record in result] == list(range(7))
    return result


def same_run(out, straight_out):
    assert records(out) == records(straight_out)
    assert (out / "trees.jsonl").read_text() == (straight_out / "trees.jsonl").read_text()  # --save-trees too


# A save cut short -----------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for kill -9: nothing catches it."""


@pytest.mark.parametrize("point", ["weights", "trainer_state", "state", "rename", "old deleted"])
def test_a_kill_at_any_point_of_a_save_loses_nothing(tmp_path, monkeypatch, straight_out, point):
    out = tmp_path / "run"

    def killed(*args, **kwargs):
        raise Killed
    original_save, rmtree = checkpoints.save, checkpoints.shutil.rmtree

    def save(out_dir, model, *args):  # the save of step 4 dies just before `point`
        if args[-1]["step"] == 4:
            spots = {"weights": (model, "save_pretrained"), "trainer_state": (checkpoints.torch, "save"),
                     "state": (Path, "write_text"), "rename": (checkpoints.os, "replace")}
            with pytest.MonkeyPatch.context() as patch:
                if point == "old deleted":
                    patch.setattr(checkpoints.shutil, "rmtree", lambda path, **kwargs: killed()
                                  if path.name == "checkpoint-000002" else rmtree(path, **kwargs))
                else:
                    patch.setattr(*spots[point], killed)
                return original_save(out_dir, model, *args)
        return original_save(out_dir, model, *args)
    monkeypatch.setattr(checkpoints, "save", save)
    with pytest.raises(Killed):
        run(out, "--steps", "6")
    monkeypatch.undo()
    assert checkpoints.newest(out).name == ("checkpoint-000004" if point == "old deleted" else "checkpoint-000002")
    assert run(out, "--steps", "6", "--resume") == 0
    same_run(out, straight_out)  # every step once, as if never interrupted
    assert [path.name for path in out.iterdir() if "checkpoint" in path.name] == ["checkpoint-000006"]


def test_a_full_disk_during_a_save_loses_nothing(tmp_path, monkeypatch, straight_out):
    out, original = tmp_path / "run", torch.save

    def disk_full(obj, path, *args, **kwargs):
        if "000004" in str(path):
            raise OSError(28, "No space left on device", str(path))
        return original(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(out, "--steps", "6")
    monkeypatch.undo()
    assert checkpoints.newest(out).name == "checkpoint-000002"
    assert run(out, "--steps", "6", "--resume") == 0
    same_run(out, straight_out)


def test_records_logged_after_the_checkpoint_are_done_again(tmp_path, straight_out):
    out = tmp_path / "run"
    assert run(out, "--steps", "4") == 0
    with open(out / "metrics.jsonl", "a") as file:  # killed after logging step 5, before its checkpoint
        file.write('{"step": 5, "reward": 0.5}\n{"step": 6, "rew')
    assert run(out, "--steps", "6", "--resume") == 0
    same_run(out, straight_out)


# Ctrl-C and SIGTERM ---------------------------------------------------------------------------------


def signal_at_call(monkeypatch, owner, name, call, signals):
    """Send `signals` to this process at the start of the `call`-th call of owner.name."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(None)
        if len(calls) == call:
            for number in signals:
                os.kill(os.getpid(), number)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)


STOPS = {  # where a stop lands (the smoke run evaluates at steps 0, 2, 4, 6) -> what the run says
    "sampling, step 3": ((train_gsm8k, "sample", 5), "after step 3 of 6; checkpoint in"),  # 2 sampling calls a step
    "the loss, step 1": ((train_gsm8k, "backward_loss", 1), "after step 1 of 6; checkpoint in"),
    "the evaluation after step 4": ((train_gsm8k, "evaluate", 3), "after step 4 of 6; checkpoint in"),
    "the evaluation before training": ((train_gsm8k, "evaluate", 1), "before training; go on with:"),
    "the last save": ((checkpoints, "save", 3), None),  # the run is complete: it says so
}


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("point", STOPS)
def test_a_stop_finishes_the_step_saves_and_prints_the_command_that_goes_on(tmp_path, monkeypatch, capsys,
                                                                          straight_out, point, number):
    out = tmp_path / "run"
    handlers = {name: signal.getsignal(name) for name in (signal.SIGINT, signal.SIGTERM)}
    where, says = STOPS[point]
    signal_at_call(monkeypatch, *where, [number])
    status = run(out, "--steps", "6")
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    assert {name: signal.getsignal(name) for name in handlers} == handlers  # the handlers are given back
    monkeypatch.undo()
    if says is None:
        assert status == 0 and printed.out.splitlines()[-1].startswith("done: steps 1-6")
    else:
        assert status == 130 and says in printed.out
        words = "go on with:" if "before training" in says else "Resume with:"
        assert run(out, *command_after(printed.out, words)) == 0
    same_run(out, straight_out)


def test_a_stop_while_a_resumed_run_loads_keeps_its_checkpoint(tmp_path, monkeypatch, capsys, straight_out):
    out = tmp_path / "run"
    assert run(out, "--steps", "4") == 0
    signal_at_call(monkeypatch, models, "load", 1, [signal.SIGINT])
    assert run(out, "--steps", "6", "--resume") == 130
    printed = capsys.readouterr().out
    monkeypatch.undo()
    assert "--overwrite" not in printed and checkpoints.newest(out).name == "checkpoint-000004"
    assert run(out, *command_after(printed, "go on with:")) == 0
    same_run(out, straight_out)


def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_remains(tmp_path, monkeypatch, capsys, straight_out):
    out = tmp_path / "run"
    signal_at_call(monkeypatch, train_gsm8k, "backward_loss", 3, [signal.SIGINT, signal.SIGINT])
    assert run(out, "--steps", "6") == 130
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err and f"the last checkpoint is {out / 'checkpoint-000002'}" in printed.err
    monkeypatch.undo()
    assert run(out, *command_after(printed.err, "resume with:")) == 0
    same_run(out, straight_out)


def test_ctrl_c_with_stdout_on_a_pipe_whose_reader_has_gone_saves_and_resumes(tmp_path, straight_out):
    """`python train_gsm8k.py ... | tee log` and Ctrl-C: tee ends too, and the run's stdout is a dead
    pipe. Nothing it prints can fail it: it saves the step, exits 130, and resumes exactly."""
    out = tmp_path / "run"
    slowed = ("import sys, time, train_gsm8k; sample = train_gsm8k.sample; "
              "train_gsm8k.sample = lambda *a, **k: (time.sleep(0.2), sample(*a, **k))[1]; "
              "train_gsm8k.main(sys.argv[1:])")
    process = subprocess.Popen([sys.executable, "-c", slowed, *SMOKE, "--out", str(out), "--steps", "6"],
                               cwd=Path(train_gsm8k.__file__).parent, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not (out / "metrics.jsonl").exists() or
                                           len((out / "metrics.jsonl").read_text().splitlines()) < 3):
        time.sleep(0.02)
    process.stdout.close()  # the reader has gone: every later write to stdout fails
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    assert checkpoints.newest(out) is not None
    assert run(out, "--steps", "6", "--resume") == 0
    same_run(out, straight_out)


def test_the_printed_commands_keep_the_environment_they_ran_in(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert stops.command(["--model", "out/my model", "--overwrite"], "--resume") == (
        "OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=0,1 python train_gsm8k.py --model 'out/my model' --resume")


# Runs that go wrong -----------------------------------------------------------------------------------


def test_non_finite_steps_are_never_applied_nor_saved_and_stop_the_run(tmp_path, monkeypatch):
    out, original, steps = tmp_path / "run", train_gsm8k.backward_loss, []

    def nan_from_step_2(model, trees, **kwargs):
        loss, stats = original(model, trees, **kwargs)
        steps.append(None)
        if len(steps) >= 2:
            for parameter in model.parameters():
                parameter.grad = torch.full_like(parameter, math.nan)
            loss = math.nan
        return loss, stats
    monkeypatch.setattr(train_gsm8k, "backward_loss", nan_from_step_2)
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: float(len(text) % 2))
    message = one_line(run(out, "--steps", "12"))
    assert message.startswith("steps 2-4 had a non-finite loss or gradient norm, so none was applied")
    assert message.endswith(f"the last checkpoint is {out / 'checkpoint-000004'}")
    assert [record.get("skipped") for record in records(out)] == [None, False, True, True, True]
    from safetensors.torch import load_file
    weights = load_file(out / "checkpoint-000004" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


@pytest.mark.parametrize("score, shown", [("1.0", "has reward '1.0'"), (math.nan, "has reward nan"),
                                          (1e308, "rewards this large overflow")])
def test_a_reward_that_is_not_a_finite_number_stops_the_run_in_one_line(tmp_path, monkeypatch, score, shown):
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False:
                        score if isinstance(score, str) else score * (len(text) % 2))  # 0 or the score
    message = one_line(run(tmp_path / "run", "--steps", "2"))
    assert message.startswith("stopped: ") and shown in message


# Damaged and busy folders -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run(out, "--steps", "4") == 0
    return out


def must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model before refusing")
    monkeypatch.setattr(models, "load", refuse)


@pytest.mark.parametrize("name", ["state.json", "trainer_state.pt", "config.json", "model.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_a_damaged_checkpoint_is_refused_in_one_line(finished, monkeypatch, capsys, name, damage):
    path = finished / "checkpoint-000004" / name
    original = path.read_bytes()
    if damage == "delete":
        path.unlink()
    else:  # cut to half, or to nothing (torch's loader raises other errors for each)
        path.write_bytes(original[:len(original) // 2 if damage == "truncate" else 0])
    if name == "state.json":  # found before the model loads; the others as their files load
        must_not_load(monkeypatch)
    try:
        status = run(finished, "--steps", "6", "--resume")
        message = one_line(status if isinstance(status, str) else capsys.readouterr().err.strip().splitlines()[-1])
        assert ("is damaged" in message and "--overwrite" in message) or f"could not load '{path.parent}'" in message
    finally:
        path.write_bytes(original)


def test_overwrite_starts_over_whatever_the_folder_holds(tmp_path, straight_out):
    out = tmp_path / "run"
    (out / "checkpoint-000009").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("not json\n")
    (out / "notes.txt").write_text("mine")
    assert run(out, "--steps", "6", "--overwrite") == 0
    same_run(out, straight_out)
    assert (out / "notes.txt").read_text() == "mine"


def test_two_runs_into_one_folder_the_second_is_refused(tmp_path):
    from filelock import FileLock
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(out / "run.lock"):  # another run holds the folder
        assert one_line(run(out, "--steps", "2")) == f"--out {out} is in use by another run: wait for it to end, " \
                                                      "or pass another --out"
    assert run(out, "--steps", "2") == 0  # the lock file a run leaves is no lock


def test_a_failed_start_leaves_its_folder_runnable_and_a_run_is_never_overwritten_unasked(tmp_path, capsys):
    out = tmp_path / "run"
    assert "exceed tiny's context of 1024 tokens" in one_line(run(out, "--segment-tokens", "600"))
    assert run(out, "--steps", "2") == 0  # the corrected command, in the same folder
    config = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**config, "smoke": False}))  # now the folder of a real run
    assert run(out, "--steps", "2") == 2
    assert f"--out {out} already holds a run: pass --resume" in capsys.readouterr().err
    (out / "run.json").write_text(json.dumps(config))
    assert run(out, "--steps", "2") == 0  # --smoke starts over a smoke run


@pytest.mark.parametrize("flags, message", [
    (["--model", "models/smolm2"], "--model models/smolm2: no such file or folder"),
    (["--data", "../nowhere/gsm8k"], "--data ../nowhere/gsm8k: no such file or folder"),
    (["--branch", "64", "--depth", "4"], "= 33,554,432 rows in the last level, over max_rows=4,096"),
    (["--lr", "-1"], "argument --lr: must be > 0"),
    (["--layout", "4x0"], "--layout 4x0: not one NxL a level"),
    (["--layout", "1x10,1x10"], "--layout: groups of one answer have nothing to be compared with"),
    (["--method", "grpo", "--root-term", "treerl"], "--layout and --root-term are TreeRPO's"),
    (["--system-prompt", "breif"], "--system-prompt breif: not a preset"),
    (["--resume"], "--resume: no checkpoint in"),
])
def test_mistakes_are_refused_in_one_line_before_anything_loads(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    must_not_load(monkeypatch)
    assert run(tmp_path / "run", *flags) == 2
    assert message in one_line(capsys.readouterr().err.strip())


# The precision and the model the loss sees ------------------------------------------------------------


def test_dtype_auto_is_bf16_on_a_gpu_and_on_a_cpu_with_bf16_instructions(monkeypatch):
    for supported in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: supported, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert models.bf16("cpu", "auto") is supported and models.bf16("cuda:1", "auto")
    assert models.bf16("cpu", "bf16") and not models.bf16("cuda", "fp32")
    with models.autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_bf16_computes_every_phase_in_bf16_and_keeps_fp32_weights(tmp_path, monkeypatch):
    from demo import evaluation
    seen = set()
    for module, name in ((train_gsm8k, "sample"), (train_gsm8k, "backward_loss"), (evaluation, "sample_trees")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _original=original, _name=name, **kwargs: seen.add((_name, (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))) or
            _original(*args, **kwargs))
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: float(len(text) % 2))
    assert run(tmp_path / "run", "--steps", "2", "--dtype", "bf16", "--kl-coef", "0.01") == 0
    assert seen == {("sample", True), ("backward_loss", True), ("sample_trees", True)}  # and the reference's forward
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "run" / "checkpoint-000002" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert records(tmp_path / "run")[2]["kl"] > 0  # after an update the reference is not the policy


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_with_dropout_off_the_kl_to_an_identical_reference_is_zero(family):
    """A config with dropout (GPT-2's modules, Llama's attention rate): the loss runs in train mode, so
    without `dropout_off` it would compute another model than the one that sampled (TRL turns it off too)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.3,
                                       embd_pdrop=0.3, attn_pdrop=0.3)) if family == "gpt2" else \
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, attention_dropout=0.3,
                                     attn_implementation="eager"))
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    roots = sample_trees(model, tokenizer, ["Say hi.", "Count."], branch=2, depth=2, segment_tokens=6)
    for root in roots:
        for leaf in leaves(root):
            leaf.reward = float(len(response_tokens(leaf)) % 2)
        assign_advantages(root, tau=0.0)
    kls = []
    for off in (False, True):
        if off:
            models.dropout_off(model)
        torch.manual_seed(1)
        kls.append(backward_loss(model.train(), roots, ref_model=reference, kl_coef=0.1)[1]["kl"])
    assert kls[0] > 1e-3 and kls[1] == pytest.approx(0.0, abs=1e-10)


def test_several_updates_per_batch_clip_and_the_first_is_the_plain_step(tmp_path, monkeypatch):
    """--updates-per-batch 2: the first update's log-probs are the old ones, so its ratio is exactly 1
    (nothing clipped) and it is the one-update step's own; the second has moved, and the clip binds."""
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: float(len(text) % 2))
    assert run(tmp_path / "once", "--steps", "2", "--lr", "0.05") == 0
    assert run(tmp_path / "twice", "--steps", "2", "--lr", "0.05", "--updates-per-batch", "2") == 0
    once, twice = records(tmp_path / "once")[1], records(tmp_path / "twice")[1]
    assert twice["updates"] == 2 and twice["clip_fractions"][0] == 0 and twice["clip_fractions"][1] > 0
    assert once["clip_fractions"] == [0] and twice["loss"] == pytest.approx(once["loss"], abs=1e-6)


def test_in_bf16_the_first_update_clips_nothing_and_the_kl_starts_at_zero(tmp_path, monkeypatch):
    """Under bf16 autocast generate's cached decoding and the teacher-forced loss differ, so old log-probs
    from sampling would clip at once; the first update's own are exactly its ratio's. The reference holds
    fp32 weights as the policy does, so before any update its k3 KL is 0."""
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: float(len(text) % 2))
    for method in ("treerpo", "treepo"):
        out = tmp_path / method
        assert run(out, "--steps", "1", "--dtype", "bf16", "--kl-coef", "0.01", "--lr", "0.05", "--method", method,
                   "--updates-per-batch", "2") == 0
        step = records(out)[1]
        assert step["tokens"] > 0 and step["clip_fractions"][0] == 0 and step["clip_fractions"][1] > 0
        assert step["kl"] == pytest.approx(0.0, abs=1e-9)  # the first update's KL: policy = reference
    cfg = train_gsm8k.parse_args(["--smoke", "--kl-coef", "0.001", "--out", str(tmp_path / "x")])
    model, _ = models.load(cfg)
    assert {p.dtype for p in models.reference_model(cfg, model, "cpu").parameters()} == {torch.float32}


def test_records_are_strict_json(tmp_path):
    import numpy
    from demo import records as run_records
    run_records.append(tmp_path / "m.jsonl", {"a": numpy.float32(0.5), "b": numpy.int64(3), "c": math.nan,
                                              "d": -math.inf, "e": torch.tensor(2.0), "f": "text"})
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"a": 0.5, "b": 3, "c": None, "d": None, "e": 2.0,
                                                              "f": "text"}


def test_a_resumed_run_without_save_trees_writes_no_trees_file(tmp_path):
    flags = ["--smoke", "--eval-size", "2", "--save-every", "2", "--show-tree-every", "0", "--out", str(tmp_path / "run")]
    train_gsm8k.main([*flags, "--steps", "2"])
    train_gsm8k.main([*flags, "--steps", "4", "--resume"])
    assert len(records(tmp_path / "run")) == 5 and not (tmp_path / "run" / "trees.jsonl").exists()
