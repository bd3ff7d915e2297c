"""A training run never loses work and never resumes wrong: faults injected into train_gsm8k.py's
--smoke run, in this process (tiny model, CPU, seconds each). Run: python -m pytest -q tests/test_runs.py"""

import errno
import json
import math
import os
import shlex
import signal
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import reward
import treerpo
from demo import checkpoints, device as devices, evaluation, records as run_records, stops
import train_gsm8k

SMOKE = ["--smoke", "--eval-size", "2", "--eval-every", "2", "--save-every", "2", "--show-tree-every", "0",
         "--save-trees"]


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """The printed commands repeat OMP_NUM_THREADS and CUDA_VISIBLE_DEVICES where set (tested on their
    own): unset here, so that the commands read the same whatever the tests run under."""
    for name in stops.KEPT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def run(out, *flags):
    """train_gsm8k.main as `python train_gsm8k.py --smoke ... --out OUT FLAGS` would run it; returns
    its exit status (0, a number, or the message SystemExit printed)."""
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


def must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model before refusing")
    monkeypatch.setattr(train_gsm8k, "load_model_and_tokenizer", refuse)


# 1-2. A save interrupted at any point leaves the last complete checkpoint ------------------------


class Killed(BaseException):
    """Stands in for kill -9: nothing catches it."""


def raise_killed(*args, **kwargs):
    raise Killed


SAVE_POINTS = ["weights", "tokenizer", "trainer_state", "run_state", "fsync", "manifest", "rename", "old deleted"]


def kill_during_save(monkeypatch, step, point):
    """Make the save of checkpoint `step` die just before `point`."""
    original = checkpoints.save_checkpoint

    def save(out, this_step, parts):
        if this_step != step:
            return original(out, this_step, parts)
        parts = [raise_killed if name == point else part for name, part in zip(SAVE_POINTS, parts)]
        with pytest.MonkeyPatch.context() as patch:
            if point == "fsync":
                patch.setattr(checkpoints, "_fsync", raise_killed)
            if point == "manifest":
                patch.setattr(checkpoints, "_write_synced", raise_killed)
            if point == "rename":
                patch.setattr(checkpoints.os, "replace", raise_killed)
            if point == "old deleted":
                rmtree = checkpoints.shutil.rmtree
                patch.setattr(checkpoints.shutil, "rmtree", lambda path, **kwargs: raise_killed()
                              if path.name == f"{checkpoints.PREFIX}{step - 2:06d}" else rmtree(path, **kwargs))
            return original(out, this_step, parts)
    monkeypatch.setattr(checkpoints, "save_checkpoint", save)


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_a_kill_at_any_point_of_a_save_loses_nothing(tmp_path, monkeypatch, straight, straight_out, point):
    out = tmp_path / "run"
    kill_during_save(monkeypatch, step=4, point=point)
    with pytest.raises(Killed):
        run(out, "--steps", "6")
    monkeypatch.undo()
    expected = "checkpoint-000004" if point == "old deleted" else "checkpoint-000002"
    assert checkpoints.newest_checkpoint(out).name == expected
    assert run(out, "--steps", "6", "--resume") == 0
    assert records(out) == straight  # every step once, as if never interrupted
    assert (out / "trees.jsonl").read_text() == (straight_out / "trees.jsonl").read_text()  # --save-trees too
    assert [folder.name for folder in out.iterdir() if "checkpoint" in folder.name] == ["checkpoint-000006"]


def test_a_full_disk_during_a_save_says_so_and_loses_nothing(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"
    original = torch.save

    def disk_full(obj, path, *args, **kwargs):
        if "000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_full)
    message = one_line(run(out, "--steps", "6"))
    assert message.startswith("the disk is full") and "checkpoint-000002; resume with: python train_gsm8k.py" in message
    monkeypatch.undo()
    assert run(out, *shlex.split(message.split("resume with: python train_gsm8k.py ")[1])[len(SMOKE) + 2:]) == 0
    assert records(out) == straight


# 4. metrics.jsonl agrees with the checkpoint ---------------------------------------------------


def test_records_after_the_checkpoint_and_a_partial_line_are_moved_aside(tmp_path, straight):
    out = tmp_path / "run"
    assert run(out, "--steps", "4") == 0
    with open(out / "metrics.jsonl", "a") as file:  # killed after logging step 5, before its checkpoint,
        file.write('{"step": 5, "reward": 0.5}\n{"step": 6, "rew')  # and a line cut short by a full disk
    assert run(out, "--steps", "6", "--resume") == 0
    assert records(out) == straight
    discarded = (out / "metrics.discarded.jsonl").read_text().splitlines()
    assert json.loads(discarded[0])["step"] == 5 and discarded[1] == '{"step": 6, "rew'


def test_records_are_strict_json():
    import numpy
    line = run_records.json_record({"a": numpy.float32(0.5), "b": numpy.int64(3), "c": math.nan, "d": -math.inf,
                                   "e": torch.tensor(2.0), "f": "text"})
    assert json.loads(line) == {"a": 0.5, "b": 3, "c": None, "d": None, "e": 2.0, "f": "text"}


# 5. Ctrl-C and SIGTERM ----------------------------------------------------------------------------


def signal_at_call(monkeypatch, owner, name, call, signals, after=False):
    """Send `signals` to this process at the start (or the end) of the `call`-th call of owner.name."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(None)
        if len(calls) == call and not after:
            for number in signals:
                os.kill(os.getpid(), number)
        result = original(*args, **kwargs)
        if len(calls) == call and after:
            for number in signals:
                os.kill(os.getpid(), number)
        return result
    monkeypatch.setattr(owner, name, wrapper)


def signal_in_update(monkeypatch, step, signals):
    """Send `signals` during step `step`'s update, once its AdamW step is committed to (a step that
    trains something: in the smoke run, steps 1, 4 and 5)."""
    steps, commit = [], stops.Stop.commit
    signal_at_call(monkeypatch, train_gsm8k, "train_step", 10**9, [])
    counted = train_gsm8k.train_step
    monkeypatch.setattr(train_gsm8k, "train_step", lambda *args: steps.append(None) or counted(*args))

    def committed(stop):
        commit(stop)
        if len(steps) == step and not stop.requested:
            for number in signals:
                os.kill(os.getpid(), number)
    monkeypatch.setattr(stops.Stop, "commit", committed)


def command_after(line: str, words: str) -> list[str]:
    """The flags of the `[VARIABLE=value ...] python train_gsm8k.py ...` command a line ends with, after
    --smoke's and --out's."""
    return shlex.split(line.split(f"{words} ")[1].split("python train_gsm8k.py ")[1])[len(SMOKE) + 2:]


# Where a stop lands: (what is wrapped, which call, after the call instead of before) and what the run must say.
STOP_POINTS = {
    "the evaluation before training": ((evaluation, "evaluate", 1), "during the evaluation before training"),
    "sampling, step 1": ((train_gsm8k, "sample_and_score", 1), "during step 1 of 6, before its update"),
    "sampling, step 3": ((train_gsm8k, "sample_and_score", 3), "during step 3 of 6, before its update"),
    "the loss, step 3": ((train_gsm8k, "backward_loss", 3), "during step 3 of 6, before its update"),
    "the update, step 5": (("update", 5), "after step 5 of 6; checkpoint in"),  # the smoke run trains in 1, 4, 5
    "the update, step 4": (("update", 4), "during the evaluation after step 4 of 6"),
    "the evaluation after step 4": ((evaluation, "evaluate", 3), "during the evaluation after step 4 of 6"),
    "the last evaluation": ((evaluation, "evaluate", 4), "during the evaluation after step 6 of 6"),
    "the last save": ((checkpoints, "save_checkpoint", 3), None),  # the run is complete: its closing line
}


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("point", STOP_POINTS)
def test_a_stop_anywhere_is_prompt_and_what_it_prints_is_true(tmp_path, monkeypatch, capsys, straight, straight_out,
                                                              point, number):
    """A stop is taken at once where the work under way can be done again on resume (sampling, the
    loss before its update, an evaluation), else after the update or save under way. Then either the
    run is complete and says so, or the command it prints leads to an uninterrupted run's records,
    evaluations and trees included."""
    out = tmp_path / "run"
    handlers = {name: signal.getsignal(name) for name in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN in a background job
    where, says = STOP_POINTS[point]
    if where[0] == "update":
        signal_in_update(monkeypatch, where[1], [number])
    else:
        signal_at_call(monkeypatch, *where, [number])
    status = run(out, "--steps", "6")
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    assert {name: signal.getsignal(name) for name in handlers} == handlers  # the handlers are given back
    monkeypatch.undo()
    if says is None:
        assert status == 0 and printed.out.splitlines()[-1].startswith("done: steps 1-6")
        assert run(out, "--steps", "6", "--resume") == 2  # complete: nothing to resume
    else:
        (line,) = [line for line in printed.out.splitlines() if line.startswith("stopped by")]
        assert status == 130 and f"stopped by {signal.Signals(number).name} {says}" in line
        words = "Start over with:" if "before training" in says else "Resume with:"
        assert run(out, *command_after(line, words)) == 0
    assert records(out) == straight
    assert (out / "trees.jsonl").read_text() == (straight_out / "trees.jsonl").read_text()


@pytest.mark.parametrize("phase, flags, kept", [
    ("sampling", [], "checkpoint-000002"),  # step 3 is dropped: its second sampling call never starts
    ("evaluation", ["--eval-size", "12", "--eval-batch-size", "2"], None)])  # six batches: the second never starts
def test_a_stop_is_taken_at_once(tmp_path, monkeypatch, phase, flags, kept):
    calls = []
    original = train_gsm8k.sample_trees

    def sample_trees(*args, **kwargs):
        calls.append(None)
        if len(calls) == (1 if phase == "evaluation" else 7):  # 7: step 3's first (evaluations 1 + 1, steps 2 each)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    for module in (train_gsm8k, evaluation):  # sampling's and the evaluation's calls, counted together
        monkeypatch.setattr(module, "sample_trees", sample_trees)
    assert run(tmp_path / "run", "--steps", "6", *flags) == 130
    assert len(calls) == (1 if phase == "evaluation" else 7)
    newest = checkpoints.newest_checkpoint(tmp_path / "run")
    assert (newest.name if newest else None) == kept


def test_an_evaluation_checks_for_a_stop_between_batches_where_it_cannot_drop_at_once(monkeypatch):
    """Under torchrun the processes must stop at the same point: no stop in the middle of a batch,
    but every process checks (all at once) before each batch."""
    cfg, _ = train_gsm8k.parse_args(["--smoke", "--out", "unused", "--eval-batch-size", "2"])
    model, tokenizer = train_gsm8k.load_model_and_tokenizer(cfg)
    stop, calls = stops.Stop(can_drop=False), []
    original = train_gsm8k.sample_trees

    def sample_trees(*args, **kwargs):
        calls.append(None)
        stop.requested = "SIGTERM"  # as the handler sets it, without raising
        return original(*args, **kwargs)
    monkeypatch.setattr(evaluation, "sample_trees", sample_trees)
    with pytest.raises(stops.Dropped):
        evaluation.evaluate(model, tokenizer, reward.SMOKE_PROBLEMS, cfg, "cpu", stop)
    assert len(calls) == 1


def test_a_second_ctrl_c_aborts_at_once_and_the_last_checkpoint_remains(tmp_path, monkeypatch, capsys, straight):
    out = tmp_path / "run"
    signal_in_update(monkeypatch, 5, [signal.SIGINT, signal.SIGINT])
    assert run(out, "--steps", "6") == 130
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    (line,) = [line for line in printed.err.splitlines() if line.startswith("aborted")]
    assert f"The last complete checkpoint is {out / 'checkpoint-000004'}; resume with:" in line
    monkeypatch.undo()
    assert run(out, *command_after(line, "resume with:")) == 0
    assert records(out) == straight


# 3, 7, 8. Non-finite steps, bad scores, dead runs ------------------------------------------------


def test_non_finite_steps_are_never_applied_nor_saved_and_stop_the_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    original, steps = train_gsm8k.backward_loss, []

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
    assert message.startswith("steps 2-4 had a non-finite loss or gradient norm, so none was applied. Likely causes")
    assert message.endswith(f"The last step's checkpoint is {out / 'checkpoint-000004'}.")
    assert [record.get("skipped") for record in records(out)] == [None, False, True, True, True]
    assert records(out)[1]["tokens"] > 0  # step 1 did update
    from safetensors.torch import load_file
    weights = load_file(out / "checkpoint-000004" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


@pytest.mark.parametrize("score, shown", [("1.0", "has reward '1.0'"), (math.nan, "has reward nan"),
                                          (torch.tensor(1.0), "has reward tensor(1.)")])
def test_a_verifier_score_that_is_not_a_finite_number_is_refused(tmp_path, monkeypatch, score, shown):
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: score)
    message = one_line(run(tmp_path / "run", "--steps", "2"))
    assert message.startswith("the verifier's reward for the answer '") and shown in message
    assert "rewards must be finite numbers" in message


def test_overflowing_scores_and_diverged_weights_stop_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: 1e308 * (len(text) % 2))
    message = one_line(run(tmp_path / "a", "--steps", "2"))
    assert message.startswith("the advantages cannot be computed: ") and "rewards this large overflow" in message
    original = train_gsm8k.sample

    def diverged(model, *args):
        with torch.no_grad():
            model.lm_head.weight.fill_(math.nan)
        return original(model, *args)
    monkeypatch.setattr(train_gsm8k, "sample", diverged)
    message = one_line(run(tmp_path / "b", "--steps", "2"))
    assert message.startswith("sampling failed: the model's next-token probabilities are not finite")


def test_a_cut_metrics_line_does_not_break_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from pictures import plots
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_lenient": 0.5}\n{"step": 1, "rew')
    assert plots.read_records(tmp_path / "metrics.jsonl") == [{"step": 0, "eval_lenient": 0.5}]
    assert plots.plot([str(tmp_path)]).exists()


def test_numpy_scores_are_numbers(tmp_path, monkeypatch):
    import numpy
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: numpy.float64(len(text) % 2))
    assert run(tmp_path / "run", "--steps", "2") == 0
    assert all(0 <= record.get("reward", 0) <= 1 for record in records(tmp_path / "run"))


def test_a_run_that_trains_nothing_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: 0.0)
    assert run(tmp_path / "run", "--steps", "6") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: steps 1-3 trained nothing")
    assert "no answer was rewarded: the questions are out of the model's reach" in warnings[0]
    assert "collapsed" not in warnings[0]  # nothing was ever rewarded: no collapse to guess at


@pytest.mark.parametrize("rewards, why", [
    ([0.5, 0.5, 0, 0, 0], "no answer was rewarded, and some were before step 3: the model may have collapsed"),
    ([1, 1, 1], "every answer was right: the task is too easy"),
    ([0.5, 0.25, 0.5], "every sibling group agreed (all right or all wrong), so none was kept"),
])
def test_the_idle_warning_says_what_the_rewards_show(rewards, why):
    history = [{"step": step, "reward": reward, "skipped": False, "tokens": 0, "grad_norm": 0.0}
               for step, reward in enumerate(rewards, start=1)]
    assert why in train_gsm8k.why_idle(history, patience=3)


# 6. Damaged state: refused in one line, before any loading; --overwrite always works ------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run(out, "--steps", "4") == 0
    return out


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_a_damaged_checkpoint_file_is_refused_by_name(finished, monkeypatch, capsys, damage):
    folder = finished / "checkpoint-000004"
    must_not_load(monkeypatch)
    for path in sorted(folder.iterdir()):
        original = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(original[:len(original) // 2])
        elif damage == "garble":
            middle = len(original) // 2
            path.write_bytes(original[:middle] + bytes(255 - byte for byte in original[middle:middle + 8])
                             + original[middle + 8:])
        else:
            path.unlink()
        status = run(finished, "--steps", "6", "--resume")
        message = status if isinstance(status, str) else capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{folder} is damaged: " in one_line(message) and "--overwrite" in message
        assert path.name in message or (path.name == "manifest.json" and "manifest.json" in message)
        path.write_bytes(original)


def test_overwrite_starts_over_whatever_the_folder_holds(tmp_path, straight):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-000009").mkdir()
    (out / "checkpoint-000009" / "manifest.json").write_text("{garbage")
    (out / "metrics.jsonl").write_text("not json\n")
    (out / "notes.txt").write_text("mine")
    assert run(out, "--steps", "6", "--overwrite") == 0
    assert records(out) == straight and (out / "notes.txt").read_text() == "mine"


def test_a_garbage_manifest_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    (out / "checkpoint-000002").mkdir(parents=True)
    (out / "checkpoint-000002" / "manifest.json").write_text("{garbage")
    must_not_load(monkeypatch)
    assert run(out, "--steps", "4", "--resume") == 2
    assert "checkpoint-000002 is damaged: manifest.json cannot be read" in capsys.readouterr().err


# One run per folder ---------------------------------------------------------------------------


def test_a_folder_in_use_is_refused_and_a_lock_file_left_behind_is_no_lock(tmp_path):
    from filelock import FileLock
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(out / "run.lock"):  # another run holds the folder
        assert one_line(run(out, "--steps", "2")) == f"--out {out} is in use by another run: wait for it to end, or pass another --out"
    assert (out / "run.lock").exists()  # as a killed run would leave it: the OS released its lock
    assert run(out, "--steps", "2") == 0


def test_smoke_starts_over_only_over_a_smoke_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--steps", "2") == 0
    assert run(out, "--steps", "2") == 0  # --smoke again: starts over its own run
    config = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**config, "smoke": False}))  # now the folder of a real run
    before = sorted(path.name for path in out.iterdir())
    assert run(out, "--steps", "2") == 2
    assert f"--out {out} already holds a run (metrics.jsonl): pass --resume" in capsys.readouterr().err.splitlines()[-1]
    assert sorted(path.name for path in out.iterdir()) == before and (out / "checkpoint-000002").is_dir()


# 11. The command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--model", "models/smolm2"], "--model models/smolm2: no such file or folder"),
    (["--model", "./nowhere"], "--model ./nowhere: no such file or folder"),
    (["--data", "../nowhere/gsm8k"], "--data ../nowhere/gsm8k: no such file or folder"),
    (["--out", "a_file/run"], "--out a_file/run: cannot create a folder there"),
    (["--branch", "64", "--depth", "4"], "= 33,554,432 rows in the last level, over max_rows=4,096"),
])
def test_local_paths_that_do_not_exist_are_refused_before_loading(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "a_file").write_text("")
    must_not_load(monkeypatch)
    assert run(tmp_path / "run", *flags) == 2
    assert message in capsys.readouterr().err


# The GPU path as far as a CPU runs it --------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "auto"])
def test_dtype_bf16_computes_every_phase_in_bf16_and_keeps_fp32_weights(tmp_path, monkeypatch, dtype):
    """--dtype bf16 on the CPU: evaluation, sampling and the loss (the KL reference's forward too) run
    under bf16 autocast, the reference is stored in bf16, the policy and AdamW stay fp32. fp32 and
    auto (on a CPU) run none of it in bf16."""
    seen = {}

    def spy(name, function):
        def wrapper(*args, **kwargs):
            seen.setdefault(name, set()).add(torch.is_autocast_enabled("cpu") and
                                             torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return function(*args, **kwargs)
        return wrapper
    for module, name in ((train_gsm8k, "sample_trees"), (evaluation, "sample_trees"), (train_gsm8k, "backward_loss")):
        monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: float(len(text) % 2))
    references = []
    original_reference = train_gsm8k.reference_model
    monkeypatch.setattr(train_gsm8k, "reference_model",
                        lambda *args: references.append(original_reference(*args)) or references[-1])
    assert run(tmp_path / "run", "--steps", "2", "--dtype", dtype, "--kl-coef", "0.01") == 0
    bf16 = dtype == "bf16"
    assert seen == {"sample_trees": {bf16}, "backward_loss": {bf16}}  # sample_trees: evaluation and sampling
    assert {parameter.dtype for parameter in references[0].parameters()} == {torch.float32}  # as the policy's
    step = records(tmp_path / "run")[2]  # after an update: the reference is not the policy any more
    assert step["tokens"] > 0 and not step["skipped"] and step["kl"] > 0
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "run" / "checkpoint-000002" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    state = torch.load(tmp_path / "run" / "checkpoint-000002" / "trainer_state.pt", weights_only=False)
    moments = [value for entry in state["optimizer"]["state"].values() for value in entry.values() if value.dim()]
    assert moments and {moment.dtype for moment in moments} == {torch.float32}


def test_bf16_where_dtype_says_and_fp32_elsewhere():
    assert all(devices.on_gpu(device) for device in ("cuda", "cuda:1", torch.device("cuda", 1), torch.device("cuda")))
    assert not any(devices.on_gpu(device) for device in ("cpu", torch.device("cpu"), "meta"))
    decisions = {(str(device), dtype): devices.computes_in_bf16(device, dtype)
                 for device in ("cpu", "cuda", "cuda:1", torch.device("cuda", 1)) for dtype in devices.DTYPES}
    assert decisions == {(device, dtype): dtype == "bf16" or (dtype == "auto" and device != "cpu")
                         for device, dtype in decisions}
    assert devices.autocast("cpu")._enabled is False and devices.autocast("cpu", "fp32")._enabled is False
    with devices.autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert devices.peak_memory("cpu") == {}
    with pytest.raises(ValueError, match="dtype must be one of"):
        devices.computes_in_bf16("cpu", "bfloat16")


def test_bf16_on_a_cpu_without_bf16_instructions_says_so(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert "no bf16 instructions" in devices.precision_note("cpu", "bf16")
    assert devices.precision_note("cpu", "fp32") is None and devices.precision_note("cpu", "auto") is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert devices.precision_note("cpu", "bf16") is None


@pytest.mark.parametrize("phase, knob", [("backward_loss", "in the loss: lower --max-row-tokens"),
                                         ("sample_trees", "in sampling: lower --sample-batch-size")])
def test_out_of_gpu_memory_names_the_phase_and_its_knobs(tmp_path, monkeypatch, phase, knob):
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(None)
        if len(calls) > 2 or phase == "backward_loss":  # sample_trees: let the step-0 evaluation through
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)
    original = getattr(train_gsm8k, phase)
    monkeypatch.setattr(train_gsm8k, phase, out_of_memory)
    message = one_line(run(tmp_path / "run", "--steps", "2"))
    assert message.startswith(f"out of GPU memory {knob}") and "(CUDA out of memory. Tried to allocate" in message


def one_step(updates_per_batch, lr=3e-3):
    """train_step on the smoke problems from a fixed seed: (its record, the weights after)."""
    cfg, _ = train_gsm8k.parse_args(["--smoke", "--kl-coef", "0", "--out", "unused", "--lr", str(lr),
                                     "--updates-per-batch", str(updates_per_batch)])
    model, tokenizer = train_gsm8k.load_model_and_tokenizer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    torch.manual_seed(0)
    record, roots = train_gsm8k.train_step(model, None, tokenizer, optimizer, reward.SMOKE_PROBLEMS[:4], cfg, "cpu")
    return record, [parameter.detach().clone() for parameter in model.parameters()], roots


def test_several_updates_per_batch_clip_the_ratio(monkeypatch):
    """--updates-per-batch 2: nothing is recorded at sampling; the first update's log-probs are the old
    ones, so its ratio is exactly 1 (nothing clipped), the second's has moved and the clip binds; each
    update's clip fraction is recorded. The first update is the one-update step's own."""
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: float(len(text) % 2))
    once, _, _ = one_step(1, lr=0.05)
    twice, _, roots = one_step(2, lr=0.05)
    assert twice["updates"] == 2 and twice["clip_fractions"][0] == 0 and twice["clip_fractions"][1] > 0
    assert twice["clip_fraction"] == sum(twice["clip_fractions"]) / 2 and once["clip_fractions"] == [0]
    trained = [node for root in roots for node in treerpo.nodes(root)[1:] if node.advantage is not None]
    assert trained and all(len(node.logprobs) == len(node.tokens) for node in trained)  # the first update's
    assert twice["loss"] == pytest.approx(once["loss"], abs=1e-4) and twice["tokens"] == once["tokens"]


@pytest.mark.parametrize("method", ["treerpo", "treepo"])
def test_in_bf16_the_first_update_clips_nothing_and_the_kl_starts_at_zero(monkeypatch, method):
    """Under bf16 autocast generate's cached decoding and the teacher-forced loss differ, so old
    log-probs from sampling would clip at once; the first update's own are exactly its ratio's. The
    reference holds fp32 weights as the policy does, so before any update its k3 KL is 0."""
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: float(len(text) % 2))
    cfg, _ = train_gsm8k.parse_args(["--smoke", "--kl-coef", "0.01", "--out", "unused", "--lr", "0.05", "--dtype",
                                     "bf16", "--updates-per-batch", "2", "--method", method])
    model, tokenizer = train_gsm8k.load_model_and_tokenizer(cfg)
    reference = train_gsm8k.reference_model(cfg, model, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    torch.manual_seed(0)
    record, _ = train_gsm8k.train_step(model, reference, tokenizer, optimizer, reward.SMOKE_PROBLEMS[:4], cfg, "cpu")
    assert record["tokens"] > 0 and record["clip_fractions"][0] == 0 and record["clip_fractions"][1] > 0
    assert record["kl"] == pytest.approx(0.0, abs=1e-9)  # the first update's KL: policy = reference


def test_one_update_per_batch_is_the_plain_step(monkeypatch):
    """--updates-per-batch 1 (the default) is the step as it always was: sample without log-probs,
    one backward_loss, one clipped AdamW step."""
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: float(len(text) % 2))
    record, weights, roots = one_step(1)
    assert record["updates"] == 1 and record["clip_fraction"] == 0 and record["clip_fractions"] == [0]
    assert all(node.logprobs is None for root in roots for node in treerpo.nodes(root)[1:])
    cfg, _ = train_gsm8k.parse_args(["--smoke", "--kl-coef", "0", "--out", "unused"])
    model, tokenizer = train_gsm8k.load_model_and_tokenizer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    torch.manual_seed(0)
    roots = train_gsm8k.credit(train_gsm8k.sample_and_score(model, tokenizer, reward.SMOKE_PROBLEMS[:4], cfg, "cpu"), cfg)
    loss, stats = treerpo.backward_loss(model, roots, clip_eps=cfg.clip_eps, temperature=cfg.temperature)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    assert loss == record["loss"] and stats["tokens"] == record["tokens"]
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(model.parameters(), weights))


def test_the_kl_reference_holds_fp32_weights_as_the_policy(monkeypatch):
    """On a GPU too (--dtype auto: bf16 autocast): a bf16 copy would compute another model."""
    cfg, _ = train_gsm8k.parse_args(["--smoke", "--kl-coef", "0.001", "--out", "unused"])
    model, _ = train_gsm8k.load_model_and_tokenizer(cfg)
    monkeypatch.setattr(devices, "on_gpu", lambda device: True)
    reference = train_gsm8k.reference_model(cfg, model, "cpu")
    assert all(parameter.dtype == torch.float32 and not parameter.requires_grad for parameter in reference.parameters())
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


# A failed start, and the small points of a new user's walk-through ----------------------------------


def test_a_start_that_fails_before_its_first_step_leaves_the_folder_as_it_was(tmp_path, capsys):
    """--segment-tokens past the model's context: one line once the tokenizer and config are known,
    before anything is sampled; no run.json, metrics.jsonl or run.lock is left, so the corrected
    command runs in the same folder without --overwrite (and an existing folder keeps what it held)."""
    out = tmp_path / "run"
    message = run(out, "--segment-tokens", "600", "--depth", "2")  # the tiny model's context: 1,024 tokens
    assert one_line(message).startswith("--depth 2 x --segment-tokens 600 = 1200 answer tokens after the longest "
                                        "prompt (") and message.endswith("exceed tiny's context of 1024 tokens: lower "
                                                                         "--segment-tokens or --depth")
    assert not out.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    assert run(tmp_path / "mine", "--segment-tokens", "600") != 0
    assert [path.name for path in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert run(out, "--steps", "2") == 0  # the corrected command, same folder


def test_a_failure_in_the_first_step_clears_the_folder_and_a_later_one_keeps_its_records(tmp_path, monkeypatch):
    """A crash in step 1 (after the step-0 evaluation's record) leaves nothing to resume from: the
    folder is cleared. A crash after a trained step's record keeps the records."""
    original, calls = train_gsm8k.backward_loss, []

    def crash_at(call):
        def backward_loss(*args, **kwargs):
            calls.append(None)
            if len(calls) == call:
                raise RuntimeError("boom")
            return original(*args, **kwargs)
        return backward_loss
    monkeypatch.setattr(train_gsm8k, "backward_loss", crash_at(1))
    with pytest.raises(RuntimeError, match="boom"):
        run(tmp_path / "first", "--steps", "4", "--save-every", "4")
    assert not (tmp_path / "first").exists()
    calls.clear()
    monkeypatch.setattr(train_gsm8k, "backward_loss", crash_at(2))
    with pytest.raises(RuntimeError, match="boom"):
        run(tmp_path / "second", "--steps", "4", "--save-every", "4")
    assert [record["step"] for record in records(tmp_path / "second")] == [0, 1]
    assert (tmp_path / "second" / "run.json").exists()


def test_a_refusal_of_the_sampler_is_one_line(tmp_path, monkeypatch):
    """A ValueError that treerpo.py raises (its guards) reaches the user as one line, not a traceback."""
    def refuse(*args, **kwargs):
        raise ValueError("the longest prompt (9 tokens) + depth * segment_tokens (2000) exceeds the model's context")
    monkeypatch.setattr(evaluation, "sample_trees", refuse)
    assert one_line(run(tmp_path / "run")).startswith("evaluation refused: the longest prompt (9 tokens)")
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: {})
    monkeypatch.setattr(train_gsm8k, "sample_trees", refuse)
    assert one_line(run(tmp_path / "run")).startswith("sampling refused: the longest prompt (9 tokens)")


def test_eval_size_past_the_split_says_so_once(tmp_path, capsys):
    assert run(tmp_path / "run", "--steps", "1", "--eval-size", "5000") == 0
    err = capsys.readouterr().err
    assert err.count("note: --eval-size 5000: the test split has 12 questions, all evaluated") == 1


def test_a_resumed_run_without_save_trees_writes_no_trees_file(tmp_path):
    flags = ["--smoke", "--eval-size", "2", "--save-every", "2", "--show-tree-every", "0", "--out", str(tmp_path / "run")]
    train_gsm8k.main([*flags, "--steps", "2"])
    train_gsm8k.main([*flags, "--steps", "4", "--resume"])
    assert len(records(tmp_path / "run")) == 5 and not (tmp_path / "run" / "trees.jsonl").exists()


def test_the_printed_commands_keep_the_environment_they_ran_in(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("HF_HOME", raising=False)
    argv = ["--model", "out/my model", "--resume"]
    assert stops.command(argv, "--resume") == ("OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=0,1 python train_gsm8k.py "
                                               "--model 'out/my model' --resume")
    (tmp_path / "metrics.jsonl").write_text("")
    assert stops.where_to_go_on(tmp_path, 4, argv).endswith("--model 'out/my model' --overwrite")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert stops.command(argv, None).startswith("CUDA_VISIBLE_DEVICES=0,1 python train_gsm8k.py")


# Stops at safe points -------------------------------------------------------------------------------


def test_a_stop_inside_a_forward_of_the_loss_leaves_the_model_and_its_checkpoint_whole(tmp_path, monkeypatch):
    """SIGTERM lands inside a decoder layer while the loss's forward runs with the output head swapped
    out (the chunked logits): nothing is raised there; the loss stops before its next forward, the
    step is dropped, and the checkpoint (the previous step's) holds the model's own untied head."""
    from offline.tiny import byte_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer, folder = byte_tokenizer(), tmp_path / "untied"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                 initializer_range=0.02)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: float(len(text) % 2))
    monkeypatch.setattr(treerpo.token_logprobs, "__defaults__", (1.0, None, None, None, 4))  # chunked: head swapped
    flags = ["--model", str(folder), "--steps", "6"]
    assert run(tmp_path / "straight", *flags) == 0
    losses, signalled, models = [], [], []
    original_loss, original_load = train_gsm8k.backward_loss, train_gsm8k.load_model_and_tokenizer

    def backward_loss(*args, **kwargs):
        losses.append(None)
        return original_loss(*args, **kwargs)

    def signal_once_in_step_4s_loss(module, args):  # a pre-hook of the first decoder layer
        head_swapped = isinstance(models[0].get_output_embeddings(), torch.nn.Identity)
        if len(losses) == 4 and torch.is_grad_enabled() and head_swapped and not signalled:
            signalled.append(None)
            os.kill(os.getpid(), signal.SIGTERM)

    def load(*args, **kwargs):
        model, tokenizer = original_load(*args, **kwargs)
        model.model.layers[0].register_forward_pre_hook(signal_once_in_step_4s_loss)
        models.append(model)
        return model, tokenizer
    monkeypatch.setattr(train_gsm8k, "backward_loss", backward_loss)
    monkeypatch.setattr(train_gsm8k, "load_model_and_tokenizer", load)
    out = tmp_path / "run"
    assert run(out, *flags) == 130 and signalled
    assert isinstance(models[0].get_output_embeddings(), torch.nn.Linear)  # the live model's head is back
    from safetensors.torch import load_file
    saved = checkpoints.newest_checkpoint(out)
    assert saved.name == "checkpoint-000003" and "lm_head.weight" in load_file(saved / "model.safetensors")
    monkeypatch.setattr(train_gsm8k, "backward_loss", original_loss)
    monkeypatch.setattr(train_gsm8k, "load_model_and_tokenizer", original_load)
    assert run(out, *flags, "--resume") == 0
    assert records(out) == records(tmp_path / "straight")


def test_ctrl_c_with_stdout_on_a_pipe_whose_reader_has_gone_saves_and_resumes(tmp_path, straight):
    """`python train_gsm8k.py ... | tee log` and Ctrl-C: tee ends too, and the run's stdout is a dead
    pipe. Nothing it prints can fail it: it saves the work done, exits 130, and resumes exactly."""
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    slowed = ("import sys, time, train_gsm8k; step = train_gsm8k.train_step; "
              "train_gsm8k.train_step = lambda *a, **k: (time.sleep(0.4), step(*a, **k))[1]; "
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
    assert checkpoints.newest_checkpoint(out) is not None
    assert run(out, "--steps", "6", "--resume") == 0
    assert records(out) == straight


def test_the_idle_warning_fires_at_the_same_step_after_a_resume(tmp_path, monkeypatch, capsys):
    """The health history is restored on resume: a run stopped after step 2 and resumed warns after
    step 3, as an unstopped one does; one resumed after its warning does not warn again."""
    monkeypatch.setattr(train_gsm8k, "gsm8k_reward", lambda text, answer, strict=False: 0.0)
    for first_steps, expected in ((2, ["warning: steps 1-3 trained nothing"]), (4, [])):
        out = tmp_path / f"after{first_steps}"
        assert run(out, "--steps", str(first_steps), "--save-every", "1") == 0
        capsys.readouterr()
        assert run(out, "--steps", "6", "--resume") == 0
        warnings = [line[:34] for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert warnings == expected
