"""train_gsm8k.py as a user runs it: its paths, its command line, and the commands the docs publish.
Tiny models, offline; a smoke run takes seconds. (Faults and stops: tests/test_runs.py.)"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import reward
import train_gsm8k
from demo import evaluation, models
from offline.tiny import byte_tokenizer, tiny_model

ROOT = Path(__file__).parent.parent


def run_script(*args):
    """Run train_gsm8k.py as a user would; returns its metrics.jsonl records."""
    out = args[args.index("--out") + 1]
    subprocess.run([sys.executable, "train_gsm8k.py", *args], check=True, cwd=ROOT, capture_output=True,
                   env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_timings(record):
    return {key: value for key, value in record.items() if not key.endswith("_s")}


def test_the_smoke_run_covers_every_path_and_its_resume_is_exact(tmp_path):
    straight = run_script("--smoke", "--steps", "6", "--out", str(tmp_path / "straight"))
    assert [record["step"] for record in straight] == list(range(7))
    assert {"eval_strict", "eval_lenient", "eval_response_tokens"} <= straight[0].keys()  # evaluated before
    assert all("eval_lenient" in straight[step] for step in (2, 4, 6))  # every --eval-every and at the end
    assert any(record.get("kept_nodes", 0) > 0 and record["grad_norm"] > 0 for record in straight)  # it updated
    for key in ("reward", "tokens_generated", "loss", "kl", "grad_norm", "kept_nodes", "pruned_nodes", "sample_s"):
        assert key in straight[1]
    assert (tmp_path / "straight" / "checkpoint-000006" / "model.safetensors").exists()
    run_script("--smoke", "--steps", "4", "--out", str(tmp_path / "resumed"))
    resumed = run_script("--smoke", "--steps", "6", "--resume", "--out", str(tmp_path / "resumed"))
    assert [without_timings(r) for r in resumed] == [without_timings(r) for r in straight]


@pytest.mark.parametrize("method, root_term", [("grpo", "none"), ("treepo", "none"), ("treerpo", "treerl"),
                                               ("treerpo", "grpo"), ("treerpo", "treepo")])
def test_every_method_and_root_term_trains(tmp_path, method, root_term):
    records = run_script("--smoke", "--steps", "2", "--method", method, "--root-term", root_term,
                         "--out", str(tmp_path / "run"))
    assert [record["step"] for record in records] == [0, 1, 2]
    assert any(record["tokens"] > 0 and record["grad_norm"] > 0 for record in records[1:])


@pytest.mark.parametrize("method", ["treepo", "grpo"])
def test_training_script_runs_every_method(tmp_path, method):
    records = run_script("--smoke", "--method", method, "--steps", "2", "--out", str(tmp_path / method))
    assert [record["step"] for record in records] == [0, 1, 2]
    assert all(record["leaves"] == 4 * 4 for record in records[1:])  # --width 4 in smoke mode, 4 questions
    if method == "grpo":  # one level: 4 answers of depth * segment_tokens = 16 tokens
        assert all(record["segments"] == 16 and record["response_tokens"] <= 16 for record in records[1:])
    assert any(record["tokens"] > 0 and record["grad_norm"] > 0 for record in records[1:])


def test_lora_training_run_and_its_resume(tmp_path):
    pytest.importorskip("peft")
    straight = run_script("--smoke", "--lora-rank", "4", "--lr", "3e-2", "--steps", "4", "--out", str(tmp_path / "a"))
    assert any(record.get("kept_nodes", 0) > 0 and record["grad_norm"] > 0 for record in straight)
    assert (tmp_path / "a" / "checkpoint-000004" / "adapter_model.safetensors").exists()  # adapters only
    assert not (tmp_path / "a" / "checkpoint-000004" / "model.safetensors").exists()
    run_script("--smoke", "--lora-rank", "4", "--lr", "3e-2", "--steps", "2", "--out", str(tmp_path / "b"))
    resumed = run_script("--smoke", "--lora-rank", "4", "--lr", "3e-2", "--steps", "4", "--resume",
                         "--out", str(tmp_path / "b"))
    assert [without_timings(r) for r in resumed[3:]] == [without_timings(r) for r in straight[3:]]


def test_a_layout_samples_its_tree_and_the_step_norm_runs(tmp_path):
    """--layout 3x4,2x6: three openings of at most 4 tokens, then two continuations of at most 6
    under each opening that did not end; --norm step takes the demo's credit path through scale_by_step."""
    out = tmp_path / "run"
    records = run_script("--smoke", "--steps", "1", "--layout", "3x4,2x6", "--norm", "step", "--save-trees",
                         "--out", str(out))
    assert records[-1]["step"] == 1
    (line,) = (out / "trees.jsonl").read_text().splitlines()
    for tree in json.loads(line)["trees"]:
        kids = {}
        for number, node in enumerate(tree["nodes"]):
            kids.setdefault(node["parent"], []).append(number)
        assert len(kids[0]) == 3 and all(len(tree["nodes"][n]["tokens"]) <= 4 for n in kids[0])
        for opening in kids[0]:
            below = kids.get(opening, [])
            assert len(below) == (0 if tree["nodes"][opening]["finished"] else 2)
            assert all(len(tree["nodes"][n]["tokens"]) <= 6 and n not in kids for n in below)


def test_the_smoke_run_honours_model_and_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    problem = {"question": "What is 7 + 1?", "answer": "7 + 1 = 8\n#### 8"}
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps(problem) + "\n")
    records = run_script("--smoke", "--steps", "1", "--data", str(data), "--out", str(tmp_path / "run"))
    assert records[1]["leaves"] == 4 * 4  # 4 prompts a step, all the one local problem: 2 x 2 leaves each
    failed = subprocess.run([sys.executable, "train_gsm8k.py", "--smoke", "--model", str(tmp_path / "no-model"),
                             "--out", str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert failed.returncode == 2 and "no-model: no such file or folder" in failed.stderr  # --model is used


def test_the_system_prompt_is_what_sampling_and_evaluation_see(monkeypatch):
    tokenizer = byte_tokenizer()
    cfg = train_gsm8k.Config(system_prompt="Reply in verse.", branch=2, depth=1, segment_tokens=2, device="cpu")
    seen = []

    def spy(model, tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        return real_sample_trees(model, tokenizer, prompts, **kwargs)
    real_sample_trees = train_gsm8k.sample_trees
    monkeypatch.setattr(train_gsm8k, "sample_trees", spy)
    monkeypatch.setattr(evaluation, "sample_trees", spy)
    model = tiny_model(len(tokenizer))
    problems = reward.word_problems("easy", "test")[:2]
    prompts = [reward.chat_prompt(tokenizer, problem["question"], cfg.system_prompt) for problem in problems]
    train_gsm8k.sample(model, tokenizer, prompts, cfg)
    evaluation.evaluate(model, tokenizer, problems, cfg, "cpu")
    assert len(seen) == 4 and all("system\nReply in verse.<|im_end|>" in prompt for prompt in seen)


# The command line --------------------------------------------------------------------------------------


def refused(argv, capsys, monkeypatch) -> str:
    """Run train_gsm8k.main(argv), which must refuse it argparse-style (exit 2, one "error:" line) before
    loading any data or model; returns that line."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded something before refusing a bad flag")
    monkeypatch.setattr(train_gsm8k, "load_problems", must_not_load)
    monkeypatch.setattr(models, "load", must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        train_gsm8k.main(argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()  # the error alone: argparse's usage block only on --help
    assert line.startswith("train_gsm8k.py: error: ")
    return line


@pytest.mark.parametrize("flags, message", [
    (["--branch", "0"], "argument --branch: must be >= 1"),
    (["--temperature", "0"], "argument --temperature: must be > 0"),
    (["--lr", "nan"], "argument --lr: must be > 0"),
    (["--steps", "-1"], "argument --steps: must be >= 0"),
    (["--kl-coef=-0.1"], "argument --kl-coef: must be >= 0"),
    (["--norm", "whiten"], "argument --norm: invalid choice: 'whiten'"),
    (["--data", "/no/such/folder/train.jsonl,/no/such/test.jsonl"], "no train file at /no/such/folder/train.jsonl"),
    (["--data", "missing.jsonl"], "--data missing.jsonl: one file, where a run needs two splits"),
    (["--model", "empty"], "--model empty: no config.json there, so it is not a model folder"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--branch", "1"], "--branch: groups of one answer have nothing to be compared with"),
    (["--method", "grpo", "--width", "1"], "--width: groups of one answer"),
    (["--method", "grpo", "--layout", "4x8,2x8"], "--layout and --root-term are TreeRPO's; --method grpo"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU found"),
])
def test_a_mistake_is_one_line_before_anything_loads_or_is_created(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "empty").mkdir()
    assert message in refused(["--smoke", "--out", str(tmp_path / "run"), *flags], capsys, monkeypatch)
    assert not (tmp_path / "run").exists()  # no folder, no run.lock left behind


def test_an_out_holding_a_run_is_refused_and_a_finished_run_is_not_resumed(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    first = run_script("--smoke", "--steps", "2", "--out", str(out))
    assert "already holds a run: pass --resume" in refused(["--out", str(out), "--device", "cpu"], capsys, monkeypatch)
    assert "already reached step 2; raise --steps" in refused(
        ["--smoke", "--steps", "2", "--resume", "--out", str(out)], capsys, monkeypatch)
    shutil.rmtree(out / "checkpoint-000002")  # a trained step's records, no checkpoint: nothing to resume
    assert "already holds a run: pass --overwrite" in refused(["--out", str(out), "--device", "cpu"], capsys,
                                                              monkeypatch)
    monkeypatch.undo()
    again = run_script("--smoke", "--steps", "2", "--overwrite", "--out", str(out))  # starts over, same seed
    assert [without_timings(r) for r in again] == [without_timings(r) for r in first]


def test_an_out_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="--out .*a_file/run: cannot create the folder"):
        train_gsm8k.main(["--smoke", "--out", str(tmp_path / "a_file" / "run")])


def test_help_lists_every_knob_with_its_default(capsys, tmp_path):
    with pytest.raises(SystemExit):
        train_gsm8k.parse_args(["--help"])
    parser_help = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for knob in dataclasses.fields(train_gsm8k.Config):
        assert f"--{knob.name.replace('_', '-')}" in parser_help
    assert "(default: 192)" in parser_help and "(default: Qwen/Qwen2.5-0.5B-Instruct)" in parser_help
    out = ["--out", str(tmp_path / "run")]
    config = train_gsm8k.parse_args([*out, "--device", "cpu"])
    assert (config.branch, config.depth, config.segment_tokens, config.lr) == (4, 2, 192, 1e-6)
    smoke = train_gsm8k.parse_args(["--smoke", "--branch", "3", *out])
    assert smoke.smoke and smoke.depth == 2 and smoke.branch == 3 and smoke.overwrite  # smoke defaults, then flags


def test_a_layout_is_the_levels_it_names():
    cfg = train_gsm8k.Config(layout="6x128,2x256")
    assert cfg.levels() == ([6, 2], [128, 256]) and cfg.answer_tokens() == 384
    assert train_gsm8k.Config(branch=3, depth=2, segment_tokens=10).levels() == ([3, 3], [10, 10])


# The commands the docs publish ---------------------------------------------------------------------------


def train_commands(text: str, monkeypatch, tmp_path) -> list:
    """The Configs of the `train_gsm8k.py` runs in the first bash block of a doc's text, run through
    bash with `python` caught: each must be a valid command line."""
    commands = text.split("```bash\n")[1].split("```")[0]
    catch = 'python() { if [ "$1" = train_gsm8k.py ]; then shift; printf "%s\\0" "$@"; echo; fi; }\n'
    printed = subprocess.run(["bash", "-c", catch + commands], capture_output=True, text=True, check=True).stdout
    monkeypatch.chdir(tmp_path)  # the runs' --out folders do not exist here
    for model in ("qwen05", "smollm2"):  # the model folders the commands name
        (tmp_path / "out" / model).mkdir(parents=True)
        (tmp_path / "out" / model / "config.json").write_text("{}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU command parses as on a GPU
    return [train_gsm8k.parse_args(line.split("\0")[:-1]) for line in printed.splitlines()]


def test_the_readmes_learning_commands_are_the_recipe(tmp_path, monkeypatch):
    """README "Does it learn?": the CPU recipe (the brief prompt, --data easy), one per method."""
    training = train_commands((ROOT / "docs" / "learning.md").read_text(), monkeypatch, tmp_path)
    assert {(cfg.method, cfg.width if cfg.method != "treerpo" else cfg.branch) for cfg in training} == {
        ("treerpo", 2), ("grpo", 8), ("grpo", 4), ("treepo", 8)}
    for cfg in training:
        prompt = reward.SYSTEM_PROMPTS.get(cfg.system_prompt, cfg.system_prompt)
        assert (cfg.data, prompt, cfg.device) == ("easy", reward.SYSTEM_PROMPTS["brief"], "cpu")
        assert (cfg.depth, cfg.segment_tokens, cfg.lr, cfg.steps) == (3, 16, 1e-5, 20)


def test_the_readmes_real_05b_command_is_the_demo_on_a_cpu(tmp_path, monkeypatch):
    """README "A real 0.5B on a CPU": the demo's defaults but for the CPU and the size of the run; no
    --dtype (auto: bf16 where the CPU has bf16 instructions)."""
    section = (ROOT / "README.md").read_text().split("**A real 0.5B on a CPU:**")[1]
    [cfg] = train_commands(section, monkeypatch, tmp_path)
    default = train_gsm8k.parse_args(["--device", "cpu", "--out", str(tmp_path / "x")])
    assert (cfg.model, cfg.device, cfg.dtype, cfg.prompts_per_step, cfg.steps, cfg.eval_size) == (
        "out/qwen05", "cpu", "auto", 4, 3, 20)
    changed = {"model", "device", "prompts_per_step", "steps", "eval_size", "out"}
    assert {name: value for name, value in vars(cfg).items() if name not in changed} == {
        name: value for name, value in vars(default).items() if name not in changed}


def test_the_credit_commands_are_runs_of_one_recipe(tmp_path, monkeypatch):
    """docs/credit.md, "Wide groups": TreeRPO N=4 with each credit, and GRPO at 9 and 15 answers, each in its
    own folder, on the same questions, answer length, prompt, reward, temperature, steps and precision."""
    section = (ROOT / "docs" / "credit.md").read_text().split("## Wide groups")[1]
    training = train_commands(section, monkeypatch, tmp_path)
    assert len({cfg.out for cfg in training}) == len(training) >= 12
    for cfg in training:
        assert (cfg.data, cfg.system_prompt, cfg.reward, cfg.depth, cfg.segment_tokens, cfg.steps, cfg.eval_size,
                cfg.temperature, cfg.dtype) == ("steps", "lines", "strict", 2, 24, 20, 200, 0.7, "fp32")


def test_the_real_05b_credit_commands_are_four_runs_of_one_recipe(tmp_path, monkeypatch):
    """docs/credit-05b.md: TreeRPO at the demo's tree and GRPO at its tokens (G = 7), seeds 0-1, each
    in its own folder, on the same model, data, answer budget, prompt, reward, steps and lr."""
    training = train_commands((ROOT / "docs" / "credit-05b.md").read_text(), monkeypatch, tmp_path)
    assert sorted((cfg.method, cfg.branch if cfg.method == "treerpo" else cfg.width, cfg.seed) for cfg in training) \
        == sorted((method, size, seed) for method, size in (("treerpo", 4), ("grpo", 7)) for seed in (0, 1))
    assert len({cfg.out for cfg in training}) == 4
    for cfg in training:
        assert (cfg.model, cfg.dtype, cfg.reward, cfg.depth, cfg.segment_tokens, cfg.steps, cfg.eval_size, cfg.lr,
                cfg.kl_coef, cfg.prompts_per_step, cfg.system_prompt) == (
            "out/qwen05", "bf16", "strict", 2, 192, 12, 100, 2e-6, 0.0, 4, "demo")


# Curves ----------------------------------------------------------------------------------------------------


def test_plot_renders_curves_of_two_runs(tmp_path):
    pytest.importorskip("matplotlib")  # .ci/run installs it; without it the next test covers the message
    from pictures import plots
    for name, rewards in (("tree", [0.1, 0.3, 0.5]), ("grpo", [0.1, 0.2, 0.3])):
        (tmp_path / name).mkdir()
        records = [{"step": 0, "eval_lenient": 0.3, "eval_strict": 0.2}] + [
            {"step": step + 1, "reward": reward, "response_tokens": 100.0, "tokens_generated": 5000, "sample_s": 2.0}
            for step, reward in enumerate(rewards)]
        records[-1] |= {"eval_lenient": 0.4, "eval_strict": 0.35}
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    plots.main([str(tmp_path / "tree"), str(tmp_path / "grpo")])
    png = (tmp_path / "tree" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_plot_without_matplotlib_or_metrics_says_so_in_one_line(tmp_path, monkeypatch):
    from pictures import plots
    with pytest.raises(SystemExit, match=f"^no metrics.jsonl in {tmp_path}$"):
        plots.main([str(tmp_path)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_lenient": 0.5}\n')
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plots.main([str(tmp_path)])
