"""Tests for treerpo.py: CPU, offline, tiny random models (see offline/tiny.py). Run: python -m pytest -q"""

import doctest
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never reach the hub; read once, when huggingface_hub is imported

import pytest
import torch

import treerpo
import reward
from reward import gsm8k_reward
from offline.tiny import byte_tokenizer, tiny_model
from probes.families import greedy_reference  # plain HF greedy decoding, cut after the first EOS
from pictures.tree_text import format_tree
from treerpo import (TreeNode, assign_advantages, backward_loss, group_advantages, leaf_path_rows, leaves, nodes, scale_by_step,
                     response_tokens, sample_trees, token_logprobs)

PROMPTS = ["hello there", "a much longer prompt, with more words in it", "x"]  # three lengths: left padding


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def eos_biased(model, tokenizer, bias=3.0):
    """Raise the EOS logit so some rows stop in the middle of a level (3.0: ~1 stop in 5 segments)."""
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
    with torch.no_grad():
        model.lm_head.bias[tokenizer.eos_token_id] = bias
    return model


def teacher_forced(model, root, node, temperature=1.0):
    """log p of `node`'s segment tokens from one unpadded forward over prompt + path, no cache."""
    ids = torch.tensor([root.tokens + response_tokens(node)])
    with torch.no_grad():
        return token_logprobs(model, ids, torch.ones_like(ids), temperature)[0, -len(node.tokens):]


def add(parent, tokens, reward=None):
    """Hand-build a child node."""
    child = TreeNode(tokens=tokens, parent=parent, depth=parent.depth + 1, reward=reward)
    parent.children.append(child)
    return child


# 1. Greedy equivalence -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("eos_bias", [0.0, 3.0])
def test_greedy_leaves_equal_plain_generate(tokenizer, arch, eos_bias):
    model = eos_biased(tiny_model(len(tokenizer), arch=arch), tokenizer, eos_bias)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=3, segment_tokens=4, do_sample=False)
    expected = [greedy_reference(model, tokenizer, prompt, max_new_tokens=3 * 4) for prompt in PROMPTS]
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS)  # outputs depend on the prompt
    for root, tokens in zip(roots, expected):
        assert [response_tokens(leaf) for leaf in leaves(root)] == [tokens] * len(leaves(root))
    if eos_bias:  # EOS really stops some rows before the last level, and some rows go on
        assert any(len(tokens) < 12 for tokens in expected) and any(len(tokens) == 12 for tokens in expected)


def test_sampling_from_a_training_model_with_gradient_checkpointing(tokenizer):
    model = tiny_model(len(tokenizer))
    expected = [greedy_reference(model, tokenizer, prompt, max_new_tokens=8) for prompt in PROMPTS]
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()  # generate would turn the cache off here; sample_trees samples in eval mode
    roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=2, segment_tokens=4, do_sample=False)
    assert [response_tokens(leaves(root)[-1]) for root in roots] == expected
    assert model.training  # and the caller's mode is back


# 2. Log-prob equivalence ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sampling_logprobs_equal_teacher_forcing(tokenizer, arch):
    model = eos_biased(tiny_model(len(tokenizer), arch=arch), tokenizer)
    torch.manual_seed(0)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=3, depth=3, segment_tokens=4, temperature=0.7,
                         return_logprobs=True)
    all_nodes = [(root, node) for root in roots for node in nodes(root)[1:]]
    assert any(node.finished and node.depth < 3 for _, node in all_nodes)  # rows that stopped mid-tree
    assert any(not node.finished and node.depth == 3 for _, node in all_nodes)  # and rows that did not
    for root, node in all_nodes:
        assert len(node.logprobs) == len(node.tokens)
        # the recorded distribution is softmax(logits / 0.7): teacher-force the same one
        expected = teacher_forced(model, root, node, temperature=0.7)
        torch.testing.assert_close(torch.tensor(node.logprobs), expected, atol=1e-4, rtol=0)


# 3. Branches are independent -----------------------------------------------------------------


def test_siblings_diverge_and_share_nothing(tokenizer):
    model = tiny_model(len(tokenizer), init_std=0.02)  # near-uniform: siblings should differ
    torch.manual_seed(0)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=3, depth=2, segment_tokens=4, return_logprobs=True)
    groups = [parent.children for root in roots for parent in nodes(root) if parent.children]
    assert all(len({tuple(child.tokens) for child in group}) == 3 for group in groups)
    # A sibling continued from an aliased (shared) cache would see its sibling's keys: its
    # recorded log-probs would then differ from a fresh forward over its own path.
    for root in roots:
        for node in nodes(root)[1:]:
            torch.testing.assert_close(torch.tensor(node.logprobs), teacher_forced(model, root, node),
                                       atol=1e-4, rtol=0)
    lists = [id(node.tokens) for root in roots for node in nodes(root)]
    assert len(lists) == len(set(lists))  # no token list is shared between nodes


# 4. Shape ------------------------------------------------------------------------------------


def test_full_tree_shape(tokenizer):
    model = tiny_model(len(tokenizer), init_std=0.02)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=3, depth=3, segment_tokens=2)
    for root in roots:
        assert len(leaves(root)) == 3 ** 3
        assert len(nodes(root)) == 1 + 3 + 9 + 27
        for node in nodes(root)[1:]:
            assert len(node.tokens) == 2 and not node.finished
            assert node.depth == node.parent.depth + 1
            assert len(node.children) == (3 if node.depth < 3 else 0)


def test_branch_and_segment_tokens_may_take_one_value_per_level(tokenizer):
    """branch=[3, 2], segment_tokens=[2, 5]: three openings of 2 tokens, two continuations of 5 each;
    a list of equal values is the int (the same tree from the same seed); a list of the wrong
    length, or with a count that is not one, is refused in one line."""
    model = tiny_model(len(tokenizer))
    root = sample_trees(model, tokenizer, PROMPTS[:1], branch=[3, 2], depth=2, segment_tokens=[2, 5])[0]
    assert len(root.children) == 3 and all(len(child.tokens) == 2 or child.finished for child in root.children)
    for node in root.children:  # a segment ended by EOS is a leaf and shorter
        assert len(node.children) == (0 if node.finished else 2)
        assert all(len(leaf.tokens) == 5 or leaf.finished for leaf in node.children)
    assert sum(len(node.children) for node in root.children) >= 2
    trees = []
    for branch, segment_tokens in ((2, 4), ([2, 2], [4, 4])):
        torch.manual_seed(0)
        trees.append([response_tokens(leaf) for root in sample_trees(model, tokenizer, PROMPTS, branch=branch, depth=2,
                                                                       segment_tokens=segment_tokens) for leaf in leaves(root)])
    assert trees[0] == trees[1]
    with pytest.raises(ValueError, match="branch has 3 values for depth 2: give one a level, or one number"):
        sample_trees(model, tokenizer, PROMPTS, branch=[2, 2, 2], depth=2, segment_tokens=4)
    with pytest.raises(ValueError, match="segment_tokens must be an integer >= 1, got 0"):
        sample_trees(model, tokenizer, PROMPTS, branch=2, depth=2, segment_tokens=[4, 0])


def test_eos_node_is_a_leaf(tokenizer):
    model = eos_biased(tiny_model(len(tokenizer)), tokenizer)
    torch.manual_seed(1)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=3, segment_tokens=4)
    all_nodes = [node for root in roots for node in nodes(root)[1:]]
    assert any(node.finished and node.depth < 3 for node in all_nodes)
    for node in all_nodes:
        if node.finished:
            assert node.children == [] and node.tokens[-1] == tokenizer.eos_token_id
            assert tokenizer.eos_token_id not in node.tokens[:-1]
        else:
            assert len(node.tokens) == 4 and tokenizer.eos_token_id not in node.tokens
            assert len(node.children) == (2 if node.depth < 3 else 0)
        assert tokenizer.pad_token_id not in node.tokens or not node.finished  # no pads after EOS


def test_depth_one_is_grpo(tokenizer):
    """depth=1, segment_tokens=max_new_tokens, branch=G: GRPO's G samples and GRPO's advantages."""
    model = tiny_model(len(tokenizer), init_std=0.02)
    torch.manual_seed(3)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=4, depth=1, segment_tokens=6)
    torch.manual_seed(3)  # the same random stream: the very same samples, drawn by plain generate
    batch = tokenizer(PROMPTS, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="left")
    flat = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=4,
                          pad_token_id=tokenizer.pad_token_id)[:, batch.input_ids.shape[1]:]
    assert [child.tokens for root in roots for child in root.children] == flat.tolist()

    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    grpo = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)  # GRPO, as TRL
    for root, group_rewards, group_grpo in zip(roots, rewards, grpo):
        for leaf, reward in zip(leaves(root), group_rewards):
            leaf.reward = reward.item()
        assign_advantages(root, tau=0.0)
        assert [leaf.advantage for leaf in leaves(root)] == pytest.approx(group_grpo.tolist(), abs=1e-6)


# 5. Values and advantages on a hand-built tree -----------------------------------------------


def hand_tree():
    """root ─┬─ a ─┬─ aa r=1         V(a) = 1/2
             │     └─ ab r=0
             ├─ b ─┬─ ba r=1         V(b) = (1 + 3/4) / 2 = 7/8
             │     └─ bb ─┬─ bba r=1   V(bb) = 3/4
             │            ├─ bbb r=1
             │            ├─ bbc r=1
             │            └─ bbd r=0
             └─ c ── r=0 (EOS)       V(c) = 0
    """
    root = TreeNode(tokens=[1, 2])
    a, b = add(root, [10]), add(root, [20])
    add(root, [30], reward=0.0)
    add(a, [11], 1.0), add(a, [12], 0.0)
    add(b, [21], 1.0)
    bb = add(b, [22])
    for reward in (1.0, 1.0, 1.0, 0.0):
        add(bb, [23], reward)
    return root


def values_and_advantages(root):
    return [(node.value, node.advantage) for node in nodes(root)]


def test_values_are_recursive_means():
    root = hand_tree()
    assign_advantages(root)
    a, b, c = root.children
    assert (a.value, b.value, c.value) == (0.5, 0.875, 0.0)
    assert b.children[1].value == 0.75
    assert root.value == pytest.approx((0.5 + 0.875 + 0.0) / 3)  # mean of children, not of the 7 leaves


def two_level_tree(first_leaf_rewards: list[list[float]]) -> TreeNode:
    """A prompt with one opening a list of leaf rewards: [[1, 0], [0, 0]] is two openings of two leaves."""
    root = TreeNode(tokens=[0])
    for rewards in first_leaf_rewards:
        opening = TreeNode(tokens=[1], parent=root, depth=1)
        opening.children = [TreeNode(tokens=[2], parent=opening, depth=2, finished=True, reward=r) for r in rewards]
        root.children.append(opening)
    return root


def test_the_step_norm_keeps_the_size_of_a_gap_that_std_forgets():
    # one right leaf of 16 under the first opening, against four of four: std credits both alike
    lucky = two_level_tree([[1, 0, 0, 0], [0] * 4, [0] * 4, [0] * 4])
    sure = two_level_tree([[1, 1, 1, 1], [0] * 4, [0] * 4, [0] * 4])
    for root in (lucky, sure):
        assign_advantages(root, norm="std", tau=0.1)
    assert lucky.children[0].advantage == pytest.approx(1.5, rel=1e-4)
    assert sure.children[0].advantage == pytest.approx(1.5, rel=1e-4)
    for root in (lucky, sure):
        assign_advantages(root, norm="none", tau=0.1)
    scale_by_step([lucky, sure])
    assert sure.children[0].advantage == pytest.approx(4 * lucky.children[0].advantage, rel=1e-5)
    kept = [node.advantage for root in (lucky, sure) for node in nodes(root)[1:] if node.advantage is not None]
    assert len(kept) == 12  # the lucky opening's own group (1, 0, 0, 0) is kept too: 4 + 4 + 4
    assert math.sqrt(sum(a * a for a in kept) / len(kept)) == pytest.approx(1.0, rel=1e-5)  # the step's scale is 1
    # the values by hand: centred 0.1875/-0.0625 (lucky, first level), 0.75/-0.25 (its leaves and sure's first level)
    rms = math.sqrt((0.1875 ** 2 + 3 * 0.0625 ** 2 + 2 * (0.75 ** 2 + 3 * 0.25 ** 2)) / 12)
    assert lucky.children[0].advantage == pytest.approx(0.1875 / rms, rel=1e-5)
    scale_by_step([two_level_tree([[0, 0], [0, 0]])])  # nothing kept: nothing to scale, no division by zero


@pytest.mark.parametrize("norm", ["std", "bernoulli", "none"])
def test_advantages_by_hand(norm):
    root = hand_tree()
    assign_advantages(root, norm=norm, tau=0.1)
    a, b, c = root.children
    top = [0.5, 0.875, 0.0]
    mu = sum(top) / 3  # 0.4583
    std_top = math.sqrt(sum((v - mu) ** 2 for v in top) / 2)  # Bessel: divide by n - 1
    by_hand = {
        "std": lambda v, values, m, s: (v - m) / (s + 1e-6),
        "bernoulli": lambda v, values, m, s: (v - m) / (m * (1 - m) + 1e-6),
        "none": lambda v, values, m, s: v - m,
    }[norm]
    for node, value in zip((a, b, c), top):
        assert node.advantage == pytest.approx(by_hand(value, top, mu, std_top))
    # {aa, ab} = {1, 0}: mean 1/2, std sqrt(1/2)
    assert a.children[0].advantage == pytest.approx(by_hand(1.0, None, 0.5, math.sqrt(0.5)))
    assert a.children[1].advantage == pytest.approx(by_hand(0.0, None, 0.5, math.sqrt(0.5)))
    # {ba, bb} = {1, 3/4}: span 0.25 >= tau, kept
    assert b.children[1].advantage == pytest.approx(by_hand(0.75, None, 0.875, math.sqrt(0.25 ** 2 / 2)))
    # {bba..bbd} = {1, 1, 1, 0}: mean 3/4, std 1/2
    assert [n.advantage for n in b.children[1].children] == pytest.approx(
        [by_hand(r, None, 0.75, 0.5) for r in (1, 1, 1, 0)])
    assert root.advantage is None


def uneven_tree() -> TreeNode:
    """root ─┬─ a r=1 (EOS)     V(a) = 1        leaves 1, 1, 1, 0, 1: mean 0.8, std sqrt(0.2)
             ├─ b ─┬─ ba r=1    V(b) = 1        {ba, bb} tied
             │     └─ bb r=1
             └─ c ─┬─ ca r=0    V(c) = 1/2      V(root) = (1 + 1 + 1/2) / 3 = 5/6
                   └─ cb r=1
    """
    root = TreeNode(tokens=[1])
    add(root, [2], 1.0)
    b, c = add(root, [3]), add(root, [4])
    add(b, [5], 1.0), add(b, [6], 1.0), add(c, [7], 0.0), add(c, [8], 1.0)
    return root


@pytest.mark.parametrize("form", ["treerl", "grpo"])
def test_the_root_term_by_hand_on_an_uneven_tree(form):
    root = uneven_tree()
    assign_advantages(root, root_term=form)
    a, b, c = root.children
    (ba, bb), (ca, cb) = b.children, c.children
    if form == "treerl":  # (V - V(root) + V - V(parent)) / sqrt(leaves below)
        expected = {a: 1 / 3, b: (1 / 3) / math.sqrt(2), c: (-2 / 3) / math.sqrt(2), ba: 1 / 6, bb: 1 / 6,
                    ca: -4 / 3, cb: 2 / 3}
    else:  # (V - V(root)) / std of the leaves + the sibling std advantage (0 in the tied group {ba, bb})
        std_leaves, first = math.sqrt(0.2) + 1e-6, 1 / 6 / (math.sqrt(1 / 12) + 1e-6)  # first level: 1, 1, 1/2
        pair = 0.5 / (math.sqrt(0.5) + 1e-6)
        expected = {a: 1 / 6 / std_leaves + first, b: 1 / 6 / std_leaves + first,
                    c: -1 / 3 / std_leaves - 2 * first, ba: 1 / 6 / std_leaves, bb: 1 / 6 / std_leaves,
                    ca: -5 / 6 / std_leaves - pair, cb: 1 / 6 / std_leaves + pair}
    assert {node: node.advantage for node in expected} == pytest.approx(expected, rel=1e-6)
    assert [node.weight for node in (a, b, c, ba, bb, ca, cb)] == [1, 2, 2, 1, 1, 1, 1]  # a node once a leaf below
    assert root.advantage is None
    assign_advantages(root)  # TreeRPO as published: the tied group is not trained, every weight 1
    assert (ba.advantage, bb.advantage) == (None, None)


def test_the_root_term_of_a_question_all_wrong_trains_nothing():
    root = two_level_tree([[0, 0], [0, 0]])
    for form in ("treerl", "grpo"):
        assign_advantages(root, root_term=form)
        assert all(node.advantage is None for node in nodes(root))


@pytest.mark.parametrize("values", [[1.0, 1.0, 0.0, 0.0], [1.0] + [0.0] * 7, [1.0, 0.0, 0.0, 0.0]])
def test_the_bernoulli_norm_divides_by_the_variance(values):
    """For 0/1 values of mean mu, bernoulli's A is 1 / sqrt(mu (1 - mu)) times the A of a norm by the
    population std, sqrt(mu (1 - mu)): 2x at mu = 1/2 ([1, 1, 0, 0]), 3.02x at mu = 1/8, 2.31x at 1/4."""
    mu = sum(values) / len(values)
    bernoulli = group_advantages(values, norm="bernoulli", eps=0.0)
    by_population_std = [(value - mu) / math.sqrt(mu * (1 - mu)) for value in values]
    assert bernoulli == pytest.approx([a / math.sqrt(mu * (1 - mu)) for a in by_population_std])
    assert bernoulli[0] / by_population_std[0] == pytest.approx({0.5: 2.0, 0.125: 3.024, 0.25: 2.309}[mu], abs=1e-3)
    assert bernoulli[0] == pytest.approx((1 - mu) / (mu * (1 - mu)))  # e.g. [1, 1, 0, 0]: 0.5 / 0.25 = 2


def test_tau_prunes_low_spread_groups():
    root = hand_tree()
    assign_advantages(root, tau=0.3)  # {ba, bb} spans 0.25 < 0.3: pruned; the others span >= 0.5
    b = root.children[1]
    assert [child.advantage for child in b.children] == [None, None]
    assert all(child.advantage is not None for child in root.children)
    assert all(child.advantage is not None for child in b.children[1].children)


@pytest.mark.parametrize("norm", ["std", "bernoulli", "none"])
@pytest.mark.parametrize("reward", [0.0, 1.0])
def test_all_equal_groups_are_pruned_never_nan(norm, reward):
    root = TreeNode(tokens=[1])
    for _ in range(2):
        child = add(root, [2])
        add(child, [3], reward), add(child, [4], reward)
    assign_advantages(root, norm=norm)
    assert all(node.advantage is None for node in nodes(root))
    assign_advantages(root, norm=norm, tau=0.0)  # with pruning off: zeros, still never NaN
    assert all(node.advantage == 0.0 for node in nodes(root)[1:])


def test_doctests():
    assert doctest.testmod(treerpo).failed == 0 and doctest.testmod(reward).failed == 0


def test_readme_example_trains(capsys, monkeypatch, tmp_path):
    """The README's usage example, run from another folder as a reader would: every step counts
    tokens, the loss moves, and the reward rises."""
    readme = Path(__file__).with_name("README.md").read_text()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the README says: from the repository's folder
    exec(readme.split("```python\n")[1].split("```")[0], {"__name__": "readme"})
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    rewards, losses, tokens = ([float(line[index]) for line in lines] for index in (3, 5, 8))
    assert len(lines) == 20 and min(tokens) > 0 and len(set(losses)) > 1
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards


def test_format_tree_on_a_hand_built_tree(tokenizer):
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    root = TreeNode(tokens=encode("Q: what is 2+3?\nA:"))
    a = add(root, encode(" 2+3 is\tlikely"))
    add(a, encode(" = 5\n"), 1.0), add(a, encode(" = 6, because three and two make six"), 0.0)
    b = add(root, encode(" 5") + [tokenizer.eos_token_id], 1.0)
    b.finished = True
    assert format_tree(root, tokenizer, width=20) == "\n".join([
        'prompt (18 tokens) "Q: what is 2+3?⏎A:"',
        '├─ d1 " 2+3 is\\tlikely"',
        '│  ├─ d2 " = 5⏎"  r=1',
        '│  └─ d2 " = 6, because three…"  r=0',
        '└─ d1 " 5<|im_end|>"  EOS  r=1',
    ])
    assign_advantages(root)
    assert format_tree(root, tokenizer, width=20) == "\n".join([
        'prompt (18 tokens) "Q: what is 2+3?⏎A:"  V=0.75  group: mean 0.75 std 0.35',
        '├─ d1 " 2+3 is\\tlikely"  V=0.50  group: mean 0.50 std 0.71  A=-0.71',
        '│  ├─ d2 " = 5⏎"  r=1  V=1.00  A=+0.71',
        '│  └─ d2 " = 6, because three…"  r=0  V=0.00  A=-0.71',
        '└─ d1 " 5<|im_end|>"  EOS  r=1  V=1.00  A=+0.71',
    ])
    assign_advantages(root, tau=0.6)  # the top group spans 0.5: pruned
    assert format_tree(root, tokenizer, width=8, show=("advantage",)) == "\n".join([
        'prompt (18 tokens) "…2+3?⏎A:"',
        '├─ d1 " 2+3 is…"  pruned',
        '│  ├─ d2 " = 5⏎"  A=+0.71',
        '│  └─ d2 " = 6, b…"  A=-0.71',
        '└─ d1 " 5<|im_…"  EOS  pruned',
    ])


# 6. Loss -------------------------------------------------------------------------------------


def scored_trees(model, tokenizer, seed=0):
    """Sampled trees with rewards: 1 when the path's first byte is even (a stand-in verifier)."""
    torch.manual_seed(seed)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=3, segment_tokens=3, return_logprobs=True)
    for root in roots:
        for leaf in leaves(root):
            leaf.reward = float(response_tokens(leaf)[-1] % 2 == 0)
        assign_advantages(root, tau=0.0)
    return roots


def test_shared_prefixes_counted_once(tokenizer):
    model = tiny_model(len(tokenizer), init_std=0.02)
    roots = scored_trees(model, tokenizer)
    kept = [node for root in roots for node in nodes(root)[1:] if node.advantage is not None]
    _, stats = backward_loss(model, roots)
    assert stats["tokens"] == sum(len(node.tokens) for node in kept)  # 14 nodes a tree, 8 leaves
    assert stats["kept_nodes"] == len(kept) and stats["pruned_nodes"] == 3 * 14 - len(kept)
    rows = [row for root in roots for row in leaf_path_rows(root)]
    assert len(rows) <= 3 * 8 and sum(sum(row["weights"]) for row in rows) == stats["tokens"]


def test_token_logprobs_of_some_columns_equal_the_full_forward(tokenizer):
    model = tiny_model(len(tokenizer))
    input_ids = torch.randint(0, 256, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # a right-padded row
    with torch.no_grad():
        full = token_logprobs(model, input_ids, attention_mask)  # (3, 11): columns 1..11
        some = token_logprobs(model, input_ids, attention_mask, columns=torch.tensor([4, 5, 8]))
    torch.testing.assert_close(some, full[:, [3, 4, 7]])
    assert full.std() > 0.5  # a peaked model: a shifted column would not pass by luck


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage(tokenizer):
    model = tiny_model(len(tokenizer))  # peaked log-probs: a misaligned old log-prob would clip
    roots = scored_trees(model, tokenizer)
    loss, stats = backward_loss(model, roots, micro_batch_size=5)
    assert stats["clip_fraction"] == 0.0  # recorded log-probs == recomputed: every ratio is 1
    kept = [node for root in roots for node in nodes(root)[1:] if node.advantage is not None]
    mean_advantage = sum(node.advantage * len(node.tokens) for node in kept) / stats["tokens"]
    assert loss == pytest.approx(-mean_advantage, abs=1e-5)  # at r = 1 the surrogate is r A = A


def test_micro_batching_does_not_change_the_gradient(tokenizer):
    model = tiny_model(len(tokenizer), init_std=0.02)
    roots = scored_trees(model, tokenizer)
    grads = []
    for micro_batch_size in (1, 100):
        model.zero_grad()
        backward_loss(model, roots, micro_batch_size=micro_batch_size)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch, attention", [("qwen2", "sdpa"), ("llama", "sdpa"), ("qwen2", "eager")])
def test_packed_tree_loss_equals_leaf_path_loss(tokenizer, arch, attention):
    """One row per tree with a tree attention mask gives the leaf-path method's loss and gradient."""
    model = eos_biased(tiny_model(len(tokenizer), arch=arch), tokenizer)  # EOS: uneven trees
    model.config._attn_implementation = attention
    roots = scored_trees(model, tokenizer)
    roots[0].children[0].advantage = None  # a pruned node whose subtree is still counted
    results = []
    for packed in (False, True):
        model.zero_grad()
        loss, stats = backward_loss(model, roots, packed=packed, micro_batch_size=4)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss, stats, grads))
    (loss, stats, grads), (packed_loss, packed_stats, packed_grads) = results
    assert packed_stats["tokens"] == stats["tokens"] and packed_stats["positions"] < stats["positions"]
    assert packed_loss == pytest.approx(loss, abs=1e-5)
    torch.testing.assert_close(packed_grads, grads, atol=1e-5, rtol=1e-4)
    assert grads.abs().sum() > 0


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_bf16_autocast_is_close_to_fp32(tokenizer, arch):
    """The demo's --dtype bf16 on a CPU: the same weights (fp32) with the compute under bf16 autocast.
    bf16 keeps 8 bits of mantissa, so each matmul's output is rounded by up to 2^-9 of its size;
    on this peaked model (log-probs spread over ~1.6 nats) that moved a log-prob by 0.02 nats on
    average and 0.1 at most. Tolerances, 2-2.5x that: mean 0.05, max 0.25 nats; the gradient within
    10% in norm and 0.99 in cosine. And a difference at all, or the compute did not run in bf16."""
    model = tiny_model(len(tokenizer), arch=arch)
    roots = scored_trees(model, tokenizer)
    input_ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    results = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                logprobs = token_logprobs(model, input_ids, torch.ones_like(input_ids))
            results.append((logprobs, *loss_and_gradient(model, roots)))
    (logprobs, loss, stats, grads), (bf16_logprobs, bf16_loss, bf16_stats, bf16_grads) = results
    difference = (bf16_logprobs - logprobs).abs()
    assert 1e-4 < difference.mean() < 0.05 and difference.max() < 0.25 and logprobs.std() > 1
    assert bf16_stats["tokens"] == stats["tokens"] and bf16_loss == pytest.approx(loss, abs=0.01)
    assert (bf16_grads - grads).norm() < 0.1 * grads.norm()
    assert torch.nn.functional.cosine_similarity(bf16_grads, grads, dim=0) > 0.99
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def loss_and_gradient(model, roots, **kwargs):
    model.zero_grad()
    loss, stats = backward_loss(model, roots, **kwargs)
    return loss, stats, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_packed_rows_are_bounded_and_count_each_segment_once(tokenizer):
    """Past max_row_tokens a tree is split into rows that repeat its prompt and ancestors as
    context. Each trained segment counts in exactly one row, and the loss and gradient do not
    depend on the split."""
    model = eos_biased(tiny_model(len(tokenizer)), tokenizer)
    roots = scored_trees(model, tokenizer)
    roots[1].children[1].advantage = None  # pruned, with a counted subtree: context, never trained
    counted_tokens = sum(len(node.tokens) for root in roots for node in nodes(root)[1:] if node.advantage is not None)
    reference = loss_and_gradient(model, roots, packed=False)
    counts = []
    for max_row_tokens in (10**6, 60, 1):
        rows = [row for root in roots for row in treerpo.packed_rows(root, max_row_tokens)]
        longest_path = max(len(root.tokens) + len(response_tokens(leaf)) for root in roots for leaf in leaves(root))
        assert all(len(row["tokens"]) <= max(max_row_tokens, longest_path) for row in rows)
        assert sum(sum(row["weights"]) for row in rows) == counted_tokens
        loss, stats, grads = loss_and_gradient(model, roots, packed=True, max_row_tokens=max_row_tokens)
        assert stats["forwards"] == len(rows) and stats["tokens"] == counted_tokens
        assert loss == pytest.approx(reference[0], abs=1e-5)
        torch.testing.assert_close(grads, reference[2], atol=1e-5, rtol=1e-4)
        counts.append(len(rows))
    assert counts[0] == 3 < counts[1] < counts[2]  # a tree a row, then split, then a path or so a row


def test_packed_row_of_a_grpo_group_holds_the_prompt_once(tokenizer):
    model = tiny_model(len(tokenizer))
    torch.manual_seed(0)
    (root,) = sample_trees(model, tokenizer, [PROMPTS[1]], branch=4, depth=1, segment_tokens=6)
    for number, leaf in enumerate(leaves(root)):
        leaf.reward = float(number % 2)
    assign_advantages(root)
    (row,) = treerpo.packed_rows(root, max_tokens=4096)
    assert row["tokens"] == root.tokens + [token for answer in root.children for token in answer.tokens]
    assert row["positions"] == list(range(len(root.tokens))) + [len(root.tokens) + i for answer in root.children
                                                                for i in range(len(answer.tokens))]
    mask = treerpo.collate([row], "cpu", packed=True)["attention_mask"][0, 0]
    first, second = len(root.tokens), len(root.tokens) + len(root.children[0].tokens)
    assert mask[second, :first].all() and not mask[second, first:second].any()  # answers never see each other


def test_an_attention_that_ignores_the_tree_mask_trains_leaf_paths(tokenizer):
    """Packing is measured, not read off the attention's name: an attention that applies its own causal mask
    (as flash-attention does, taking no 4D mask) gives a packed row other log-probs, so the default trains
    leaf paths, with the packed loss of an attention that reads the mask; packed=True is refused in one line."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    AttentionInterface.register("causal_only", lambda module, query, key, value, attention_mask, **kwargs:
                                sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs))
    model = tiny_model(len(tokenizer))
    roots = scored_trees(model, tokenizer)
    packed_loss, packed_stats, packed_grads = loss_and_gradient(model, roots)
    assert packed_stats["packed"] is True
    model.config._attn_implementation = "causal_only"
    loss, stats, grads = loss_and_gradient(model, roots)
    assert stats["packed"] is False and stats["positions"] > packed_stats["positions"]
    assert loss == pytest.approx(packed_loss, abs=1e-5)
    torch.testing.assert_close(grads, packed_grads, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="^packed=True: a packed row of Qwen2ForCausalLM gave log-probs off by .* from "
                                         "its leaf paths'; packed=False trains leaf paths, with the same result$"):
        backward_loss(model, roots, packed=True)


def tiny_mistral(vocab_size: int, window: int | None):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window, initializer_range=0.2)
    config._attn_implementation = "sdpa"
    return MistralForCausalLM(config).eval()


def test_a_sliding_window_shorter_than_a_path_trains_leaf_paths(tokenizer):
    """A packed row's tree mask replaces the model's own, window included. Where a model slides a
    window shorter than a path (Mistral, Gemma), the default trains leaf paths, which get the
    model's own window, and packed=True is refused; a window no path outgrows changes nothing."""
    roots = scored_trees(eos_biased(tiny_model(len(tokenizer)), tokenizer), tokenizer)
    longest = max(len(root.tokens) + len(response_tokens(leaf)) for root in roots for leaf in leaves(root))
    short = tiny_mistral(len(tokenizer), window=longest // 2)
    loss, stats, grads = loss_and_gradient(short, roots)
    assert stats["packed"] is False
    with pytest.raises(ValueError, match="packed=True: a packed row of MistralForCausalLM gave log-probs off by"):
        backward_loss(short, roots, packed=True)
    short.config.sliding_window = None  # the same weights without the window: the window did matter
    assert loss_and_gradient(short, roots, packed=False)[0] != pytest.approx(loss, abs=1e-4)
    wide = tiny_mistral(len(tokenizer), window=longest)
    packed_loss, packed_stats, packed_grads = loss_and_gradient(wide, roots)
    assert packed_stats["packed"] is True
    leaf_loss, _, leaf_grads = loss_and_gradient(wide, roots, packed=False)
    assert packed_loss == pytest.approx(leaf_loss, abs=1e-5)
    torch.testing.assert_close(packed_grads, leaf_grads, atol=1e-5, rtol=1e-4)


def test_the_reference_gets_the_mask_its_own_attention_reads(tokenizer):
    """An eager reference beside an sdpa policy: each reads the packed tree mask in its own form
    (eager adds 0 / -inf; a bool mask added as 0 / 1 would be wrong), so the KL equals leaf paths'."""
    model = tiny_model(len(tokenizer))
    roots = scored_trees(model, tokenizer)
    references = {attention: tiny_model(len(tokenizer), seed=1) for attention in ("sdpa", "eager")}
    references["eager"].config._attn_implementation = "eager"
    expected = backward_loss(model, roots, ref_model=references["sdpa"], kl_coef=0.1, packed=False)[1]["kl"]
    for reference in references.values():
        loss, stats = backward_loss(model, roots, ref_model=reference, kl_coef=0.1)
        assert stats["packed"] is True and stats["kl"] == pytest.approx(expected, rel=1e-4) and expected > 0


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_logits_in_chunks_equal_logits_at_once(tokenizer, arch):
    """Past chunk_size scored positions the output projection runs a chunk at a time (recomputed in
    the backward pass): the same log-probs and gradients, and no call sees more than a chunk."""
    model = tiny_model(len(tokenizer), arch=arch)
    input_ids = torch.randint(len(tokenizer), (2, 30), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    results, seen = [], []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    for chunk_size in (10**6, 7):
        model.zero_grad()
        seen.clear()
        logprobs = treerpo.token_logprobs(model, input_ids, attention_mask, temperature=0.7, head=model.lm_head,
                                          chunk_size=chunk_size)
        (logprobs * torch.linspace(-1, 1, logprobs.shape[1])).sum().backward()
        results.append((logprobs.detach(), [p.grad.clone() for p in model.parameters()], list(seen)))
    hook.remove()
    (whole, whole_grads, whole_calls), (chunked, chunked_grads, chunked_calls) = results
    torch.testing.assert_close(chunked, whole)
    for chunked_grad, whole_grad in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(chunked_grad, whole_grad, atol=1e-5, rtol=1e-4)  # summed in another order
    assert whole_calls == [29] and max(chunked_calls) == 7 and sum(chunked_calls) == 2 * 29  # recomputed once
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the head is back


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes no logits_to_keep (and no **kwargs)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.device = model, model.config, model.device

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_the_head_runs_in_chunks_only_where_the_logits_are_head_of_the_hidden_state(tokenizer):
    """Measured on a few prompt tokens, whatever the family: Granite's scaled logits are head(scaled hidden
    state), so its head is chunked exactly; Gemma 2's soft-capped ones are not, so its head is not chunked."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM
    model = tiny_model(len(tokenizer))
    roots = scored_trees(model, tokenizer)
    assert treerpo.plain_output_head(model, roots, "cpu") is model.lm_head
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    granite = GraniteForCausalLM(GraniteConfig(**shape, logits_scaling=0.5))
    assert treerpo.plain_output_head(granite, roots, "cpu") is granite.lm_head
    gemma = Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=0.1, attn_implementation="eager"))
    assert treerpo.plain_output_head(gemma, roots, "cpu") is None


def test_a_forward_without_logits_to_keep_gives_the_same_loss(tokenizer):
    model = tiny_model(len(tokenizer))
    roots = scored_trees(model, tokenizer)
    for packed in (True, False):
        expected = loss_and_gradient(model, roots, packed=packed)
        loss, stats, grads = loss_and_gradient(WithoutLogitsToKeep(model), roots, packed=packed)
        assert loss == pytest.approx(expected[0], abs=1e-6)
        torch.testing.assert_close(grads, expected[2])


def test_one_step_raises_the_rewarded_segment(tokenizer):
    model = tiny_model(len(tokenizer), init_std=0.02)
    root = TreeNode(tokens=tokenizer("go: ", add_special_tokens=False).input_ids)
    good, bad = add(root, [65, 66, 67], 1.0), add(root, [70, 71, 72], 0.0)
    assign_advantages(root)
    before = [teacher_forced(model, root, node).sum() for node in (good, bad)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    backward_loss(model, [root])
    optimizer.step()
    after = [teacher_forced(model, root, node).sum() for node in (good, bad)]
    assert after[0] > before[0] + 0.01 and after[1] < before[1] - 0.01


def test_kl_is_zero_against_itself_and_positive_after_a_step(tokenizer):
    model = tiny_model(len(tokenizer), init_std=0.02)
    reference = tiny_model(len(tokenizer), init_std=0.02)  # same seed: the same weights
    roots = scored_trees(model, tokenizer)
    _, stats = backward_loss(model, roots, ref_model=reference, kl_coef=0.1)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.zero_grad()
    _, stats = backward_loss(model, roots, ref_model=reference, kl_coef=0.1)
    assert stats["kl"] > 1e-4 and stats["clip_fraction"] > 0  # the ratio has moved off 1 too


def test_the_clip_counts_only_where_it_binds():
    """r > 1 + eps with A > 0, or r < 1 - eps with A < 0: there the gradient is 0. A ratio past the
    clip on the other side is not clipped (min() keeps its unclipped term), as TRL counts it."""
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 0.9]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]])
    logprobs = ratios.log().requires_grad_()
    loss, sums = treerpo.ppo_clip_loss(logprobs, torch.zeros_like(ratios), advantages, torch.ones_like(ratios))
    loss.backward()
    binds = logprobs.grad[0] == 0
    assert sums["clipped"] == 2 and binds.tolist() == [True, False, False, True, False, False]


def test_keep_logprobs_makes_the_next_ratio_against_this_pass(tokenizer):
    """With none recorded the first pass's ratio is exactly 1; keep_logprobs stores its log-probs in
    the trained nodes (each trained node's tokens, as teacher forcing gives them), and a later pass
    after an update takes them as old: its ratio has moved and the clip binds. Packed rows and leaf
    paths store the same."""
    model = tiny_model(len(tokenizer), init_std=0.02)
    stored = {}
    for packed in (True, False):
        torch.manual_seed(0)
        roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=3, segment_tokens=3)
        for root in roots:
            for leaf in leaves(root):
                leaf.reward = float(response_tokens(leaf)[-1] % 2 == 0)
            assign_advantages(root, tau=0.0)
        _, stats = backward_loss(model, roots, packed=packed, keep_logprobs=True)
        model.zero_grad()
        assert stats["clip_fraction"] == 0
        trained = [node for root in roots for node in nodes(root)[1:] if node.advantage is not None]
        assert trained and all(node.logprobs is None for root in roots for node in nodes(root)[1:]
                               if node.advantage is None)
        for root in roots:
            for node in nodes(root)[1:]:
                if node.advantage is not None:
                    torch.testing.assert_close(torch.tensor(node.logprobs), teacher_forced(model, root, node))
        stored[packed] = [node.logprobs for node in trained]
    torch.testing.assert_close(torch.tensor(sum(stored[True], [])), torch.tensor(sum(stored[False], [])))
    _, stats = backward_loss(model, roots)  # the stored ones are this policy's: ratio 1
    assert stats["clip_fraction"] == 0
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.zero_grad()
    _, stats = backward_loss(model, roots)
    assert stats["clip_fraction"] > 0


def test_under_bf16_autocast_an_fp32_reference_has_kl_zero(tokenizer):
    """A reference with the policy's fp32 weights computes exactly what the policy does under the
    same autocast: KL 0 before any update, where a bf16 copy does not give 0."""
    import copy
    model = tiny_model(len(tokenizer), init_std=0.02)
    roots = scored_trees(model, tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, same = backward_loss(model, roots, ref_model=copy.deepcopy(model).requires_grad_(False), kl_coef=0.1)
        _, rounded = backward_loss(model, roots, ref_model=copy.deepcopy(model).to(torch.bfloat16), kl_coef=0.1)
    assert same["kl"] == 0.0 and rounded["kl"] > 0


# 7. It learns --------------------------------------------------------------------------------


def test_treerpo_learns_a_toy_task(tokenizer):
    """Reward = share of lowercase letters in the response (~10% for a random model)."""
    torch.manual_seed(0)
    model = tiny_model(len(tokenizer), init_std=0.02).train()
    letters = set(tokenizer("abcdefghijklmnopqrstuvwxyz", add_special_tokens=False).input_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mean_rewards = []
    for step in range(30):
        roots = sample_trees(model, tokenizer, ["count: ", "spell: ", "go ", "abc "], branch=3, depth=2,
                             segment_tokens=4)
        rewards = []
        for root in roots:
            for leaf in leaves(root):
                response = response_tokens(leaf)
                leaf.reward = sum(token in letters for token in response) / len(response)
                rewards.append(leaf.reward)
            assign_advantages(root)
        optimizer.zero_grad()
        backward_loss(model, roots)
        optimizer.step()
        mean_rewards.append(sum(rewards) / len(rewards))
    first, last = sum(mean_rewards[:3]) / 3, sum(mean_rewards[-3:]) / 3
    assert first < 0.2 and last > 0.5, mean_rewards


# LoRA: a PeftModel goes through treerpo.py unchanged --------------------------------------------


def test_a_lora_model_needs_no_change(tokenizer):
    peft = pytest.importorskip("peft")
    from demo.models import adapters_off
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(eos_biased(tiny_model(len(tokenizer)), tokenizer), config)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give the adapters weight, so they matter
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    torch.manual_seed(0)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=2, segment_tokens=4, temperature=0.7,
                         return_logprobs=True)
    for root in roots:
        for node in nodes(root)[1:]:
            assert node.logprobs == pytest.approx(teacher_forced(model, root, node, 0.7).tolist(), abs=1e-4)
        for number, leaf in enumerate(leaves(root)):
            leaf.reward = float(number % 2)
        assign_advantages(root, tau=0.0)
    loss, stats = backward_loss(model, roots, ref_model=adapters_off(model), kl_coef=0.1, temperature=0.7)
    assert stats["tokens"] > 0 and stats["kl"] > 0  # the reference (adapters off) differs from the policy
    trained = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert trained and all("lora_" in name for name in trained)  # only the adapters learn
    root, node = roots[0], nodes(roots[0])[1]
    with model.disable_adapter():
        without_adapters = teacher_forced(model, root, node)
    assert not torch.allclose(without_adapters, teacher_forced(model, root, node))  # the adapters were in the path


# 8. Bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(branch=0), "branch must be an integer >= 1"),
    (dict(depth=0), "depth must be an integer >= 1"),
    (dict(segment_tokens=0), "segment_tokens must be an integer >= 1"),
    (dict(branch=2.5), "branch must be an integer >= 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(top_p=0.0), "top_p in \\(0, 1\\], got 1.0 and 0.0"),
    (dict(prompts=[]), "prompts must be a non-empty list of strings, got \\[\\]"),
    (dict(prompts="one string"), "prompts must be a non-empty list of strings, got 'one string'"),
    (dict(prompts=["fine", ""]), "prompt 1 encodes to no tokens"),
    (dict(prompts=["a" * 1020]), "exceeds the model's context of 1024 tokens"),
])
def test_bad_sampling_arguments(tokenizer, kwargs, message):
    model = tiny_model(len(tokenizer))
    arguments = dict(prompts=["hi"], branch=2, depth=2, segment_tokens=4) | kwargs
    prompts = arguments.pop("prompts")
    with pytest.raises(ValueError, match=message):
        sample_trees(model, tokenizer, prompts, **arguments)


# One value per refused generation_config field, away from its neutral value.
REFUSED_VALUES = dict(
    min_p=0.1, typical_p=0.9, epsilon_cutoff=1e-3, eta_cutoff=1e-3, top_h=0.5, no_repeat_ngram_size=1,
    encoder_no_repeat_ngram_size=1, encoder_repetition_penalty=1.3, bad_words_ids=[[5]], force_words_ids=[[5]],
    suppress_tokens=[5], begin_suppress_tokens=[5], sequence_bias={(5,): -1.0}, forced_bos_token_id=5,
    forced_eos_token_id=5, forced_decoder_ids=[[1, 5]], exponential_decay_length_penalty=(2, 1.1),
    renormalize_logits=True, min_length=3, min_new_tokens=2, num_beams=2, num_beam_groups=2, diversity_penalty=0.5,
    num_return_sequences=2, penalty_alpha=0.6, dola_layers="low", guidance_scale=1.5,
    watermarking_config={"greenlist_ratio": 0.25}, stop_strings=["\n"], max_time=1.0, prompt_lookup_num_tokens=3)


def test_every_refused_generation_field_has_a_test():
    assert set(REFUSED_VALUES) == set(treerpo.REFUSED_GENERATION)


@pytest.mark.parametrize("name", sorted(REFUSED_VALUES))
def test_generation_config_that_changes_the_samples_is_refused(tokenizer, name):
    """Each of these makes `generate` sample from another distribution than the one recorded, or
    return other rows; both samplers refuse it in one line, naming the field and the way out."""
    import treepo
    model = tiny_model(len(tokenizer))
    setattr(model.generation_config, name, REFUSED_VALUES[name])
    message = f"generation_config.{name} = .* set it to"
    with pytest.raises(ValueError, match=message):
        sample_trees(model, tokenizer, PROMPTS, branch=2, depth=1, segment_tokens=2)
    with pytest.raises(ValueError, match=message):
        treepo.sample_budgeted_trees(model, tokenizer, PROMPTS, width=2, segment_tokens=2, max_depth=1)
    setattr(model.generation_config, name, treerpo.REFUSED_GENERATION[name])  # its neutral value: fine
    sample_trees(model, tokenizer, PROMPTS, branch=2, depth=1, segment_tokens=2)


def test_common_sampling_settings_of_the_model_are_overridden(tokenizer):
    """A Qwen-Instruct-like generation_config (top_k, top_p, temperature, repetition penalty, greedy)
    changes nothing: the tree is sampled from softmax(logits / temperature) and recorded as such."""
    model = tiny_model(len(tokenizer))
    for name, value in dict(do_sample=False, temperature=0.2, top_k=3, top_p=0.5, repetition_penalty=1.5,
                            cache_implementation="static").items():
        setattr(model.generation_config, name, value)
    torch.manual_seed(0)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=3, depth=2, segment_tokens=4, return_logprobs=True)
    siblings = [node.tokens for node in roots[0].children]
    assert len(set(map(tuple, siblings))) > 1  # sampled, not greedy
    for root in roots:
        for node in nodes(root)[1:]:
            torch.testing.assert_close(torch.tensor(node.logprobs), teacher_forced(model, root, node), atol=1e-4, rtol=0)


def test_a_tree_too_big_for_max_rows_is_refused_before_sampling(tokenizer):
    import treepo
    model = tiny_model(len(tokenizer))
    with pytest.raises(ValueError, match="2 prompts x branches \\[64, 64, 64, 64\\] = 33,554,432 rows .* max_rows=4,096"):
        sample_trees(model, tokenizer, ["a", "b"], branch=64, depth=4, segment_tokens=8)
    with pytest.raises(ValueError, match="2 prompts x width 5000 = 10,000 rows .* max_rows=4,096"):
        treepo.sample_budgeted_trees(model, tokenizer, ["a", "b"], width=5000, segment_tokens=8, max_depth=2)
    assert len(leaves(sample_trees(model, tokenizer, ["a"], branch=4, depth=2, segment_tokens=1, max_rows=16)[0])) == 16


def test_tokenizer_without_pad_and_eos_is_refused(tokenizer):
    bare = byte_tokenizer()
    bare.pad_token, bare.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        sample_trees(tiny_model(len(tokenizer)), bare, ["hi"], branch=2, depth=1, segment_tokens=2)


def test_missing_pad_token_falls_back_to_eos(tokenizer):
    no_pad = byte_tokenizer()
    no_pad.pad_token = None
    model = eos_biased(tiny_model(len(tokenizer)), tokenizer)
    torch.manual_seed(0)
    with_pad = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=2, segment_tokens=4)
    torch.manual_seed(0)
    without = sample_trees(model, no_pad, PROMPTS, branch=2, depth=2, segment_tokens=4)
    tokens = lambda roots: [node.tokens for root in roots for node in nodes(root)]  # noqa: E731
    assert tokens(without) == tokens(with_pad)


@pytest.mark.parametrize("reward, message", [(math.nan, "has reward nan"), (math.inf, "has reward inf"),
                                             (None, "has no reward"), ("1.0", "has reward '1.0'"),
                                             (torch.tensor(1.0), "has reward tensor")])
def test_bad_rewards_are_refused(reward, message):
    root = hand_tree()
    leaves(root)[0].reward = reward
    with pytest.raises(ValueError, match=message):
        assign_advantages(root)


def test_numpy_and_bool_rewards_are_numbers():
    import numpy
    root = hand_tree()
    for leaf, reward in zip(leaves(root), [numpy.float32(1.0), True, numpy.int64(0), 0.0]):
        leaf.reward = reward
    assign_advantages(root)
    assert all(type(node.value) is float for node in nodes(root))


def test_overflowing_rewards_and_nan_advantages_are_refused(tokenizer):
    root = TreeNode(tokens=[1, 2])
    for reward in (1e308, 1e308, 0.0, 0.0):
        add(root, [3], reward)
    with pytest.raises(ValueError, match="non-finite advantages: rewards this large overflow"):
        assign_advantages(root)
    import treepo
    with pytest.raises(ValueError, match="non-finite advantage: rewards this large overflow"):
        treepo.assign_treepo_advantages([root])
    for leaf, reward in zip(leaves(root), (1.0, 0.0, 0.0, 1.0)):
        leaf.reward = reward
    assign_advantages(root)
    root.children[2].advantage = math.nan
    model = tiny_model(len(tokenizer))
    with pytest.raises(ValueError, match="a depth-1 node of tree 0 has advantage nan"):
        backward_loss(model, [root])
    assert all(parameter.grad is None for parameter in model.parameters())


def test_greedy_sampling_ignores_temperature_and_top_p(tokenizer):
    model = tiny_model(len(tokenizer))
    greedy = dict(branch=1, depth=1, segment_tokens=4, do_sample=False)
    zero = sample_trees(model, tokenizer, ["hi"], temperature=0.0, top_p=0.0, **greedy)
    assert zero[0].children[0].tokens == sample_trees(model, tokenizer, ["hi"], **greedy)[0].children[0].tokens


@pytest.mark.parametrize("flag", ["branch", "depth", "segment_tokens"])
def test_booleans_are_not_counts(tokenizer, flag):
    arguments = dict(branch=2, depth=1, segment_tokens=2) | {flag: True}
    with pytest.raises(ValueError, match=f"{flag} must be an integer >= 1, got True"):
        sample_trees(tiny_model(len(tokenizer)), tokenizer, ["hi"], **arguments)


def scored_tree(tokenizer, model):
    (root,) = sample_trees(model, tokenizer, ["hi"], branch=2, depth=2, segment_tokens=3)
    for number, leaf in enumerate(leaves(root)):
        leaf.reward = float(number % 2)
    return root


@pytest.mark.parametrize("change, message", [
    (lambda root: dict(trees=[TreeNode(tokens=[1, 2])]), "tree 0 has no values or advantages: call assign_advantages"),
    (lambda root: dict(trees=root), "trees must be a list of TreeNode roots, got TreeNode"),
    (lambda root: dict(temperature=0.0), "temperature must be > 0"),
    (lambda root: dict(micro_batch_size=0), "micro_batch_size must be an integer >= 1, got 0"),
    (lambda root: dict(micro_batch_size=2.0), "micro_batch_size must be an integer >= 1, got 2.0"),
])
def test_bad_loss_arguments_are_refused_before_any_forward(tokenizer, change, message):
    model = tiny_model(len(tokenizer))
    root = scored_tree(tokenizer, model)
    assign_advantages(root, tau=0.0)
    arguments = dict(trees=[root]) | change(root)
    with pytest.raises(ValueError, match=message):
        backward_loss(model, arguments.pop("trees"), **arguments)
    assert all(parameter.grad is None for parameter in model.parameters())  # nothing ran


def test_bad_norm_and_missing_reference_are_refused(tokenizer):
    with pytest.raises(ValueError, match="norm must be one of"):
        assign_advantages(hand_tree(), norm="zscore")
    with pytest.raises(ValueError, match="norm must be one of"):
        group_advantages([1.0, 0.0], norm="Std")
    root = hand_tree()
    assign_advantages(root)
    with pytest.raises(ValueError, match="needs ref_model"):
        backward_loss(tiny_model(len(tokenizer)), [root], kl_coef=0.1)


# reward.py -----------------------------------------------------------------------------------

# (completion, reference, lenient reward, strict reward): what models really write
REWARD_CASES = [
    ("#### 42", "42", 1.0, 1.0),
    ("Step 1: 6 * 7 = 42.\n#### 42", "42", 1.0, 1.0),
    ("So she has \\boxed{18} eggs.", "18", 1.0, 1.0),
    ("\\boxed{18}", "Janet sells 16 - 3 - 4 = 9 eggs... 9 * 2 = 18\n#### 18", 1.0, 1.0),  # full GSM8K field
    ("\\boxed{\\$18}", "18", 1.0, 1.0),
    ("\\boxed{18 \\text{ dollars}}", "18", 1.0, 1.0),
    ("\\boxed{1,234}", "1234", 1.0, 1.0),
    ("First \\boxed{3}, no wait, \\boxed{5}", "5", 1.0, 1.0),  # the last box wins
    ("\\boxed{5} and then 7 more words 9", "5", 1.0, 1.0),  # a box beats later numbers
    ("#### 5\nsome rambling with 12 in it", "5", 1.0, 1.0),  # #### beats later numbers
    ("#### $1,234.50.", "1234.5", 1.0, 1.0),
    ("#### 42 dollars", "42", 1.0, 1.0),
    ("#### -7", "-7", 1.0, 1.0),
    ("#### 42.0", "42", 1.0, 1.0),
    ("#### 42.00", "42", 1.0, 1.0),
    ("#### 0.5", ".5", 1.0, 1.0),
    ("#### \u22127", "-7", 1.0, 1.0),  # Unicode minus
    ("#### 50%", "50", 1.0, 1.0),
    ("#### 43", "42", 0.0, 0.0),
    ("#### 4.2", "42", 0.0, 0.0),
    ("#### 420", "42", 0.0, 0.0),
    ("The answer is $1,234.50.", "1234.5", 1.0, 0.0),
    ("The answer is 18 because 3 + 15 = 18 and 2 more", "18", 1.0, 0.0),  # phrase beats last number
    ("The final answer is: 7", "7", 1.0, 0.0),
    ("Answer: 12 apples", "12", 1.0, 0.0),
    ("She pays 5 * 3 = 15 dollars. So 15", "15", 1.0, 0.0),
    ("She pays 5 * 3 = 15 dollars.", "15", 1.0, 0.0),  # trailing unit and period
    ("15 + 3 = 18. Then 18 - 4 = 14.", "14", 1.0, 0.0),  # several numbers: the final one wins
    ("15 + 3 = 18. Then 18 - 4 = 14.", "18", 0.0, 0.0),  # ... not the first
    ("It costs $3,000,000 in total", "3000000", 1.0, 0.0),
    ("The temperature is -7 degrees", "-7", 1.0, 0.0),
    ("The result is 42.0", "42", 1.0, 0.0),
    ("She has 0.25 of the pie", "0.25", 1.0, 0.0),
    ("I don't know.", "42", 0.0, 0.0),  # no number at all
    ("", "42", 0.0, 0.0),
    ("####", "42", 0.0, 0.0),  # an empty ####: strict finds it and stops
    ("\\boxed{}", "42", 0.0, 0.0),
    ("\\boxed{x}", "42", 0.0, 0.0),
    ("the answer is unclear, maybe 42", "42", 1.0, 0.0),  # phrase with no number: fall through
    ("\\boxed{42", "42", 1.0, 0.0),  # unclosed box: not a box, lenient still reads 42
    ("#### 1,000", "1000", 1.0, 1.0),
    ("So 2/3 of 9 is 6.", "6", 1.0, 0.0),
    ("<|im_end|>#### 8<|im_end|>", "8", 1.0, 1.0),
    ("Total: 7 + 8 = 15\n\n**Answer: 15**", "15", 1.0, 0.0),
]


@pytest.mark.parametrize("completion, reference, lenient, strict", REWARD_CASES)
def test_gsm8k_reward_cases(completion, reference, lenient, strict):
    assert gsm8k_reward(completion, reference) == lenient
    assert gsm8k_reward(completion, reference, strict=True) == strict


def test_reward_is_fast_on_long_garbage():
    import random
    import time
    rng = random.Random(0)
    alphabet = "0123456789,.-{}\\#$ abcboxedanswer is\n"
    texts = ["".join(rng.choice(alphabet) for _ in range(200_000)), "\\boxed{" * 30_000, "#" * 200_000,
             "1," * 100_000, "answer is " * 20_000, "9" * 200_000]
    start = time.perf_counter()
    for text in texts:
        gsm8k_reward(text, "42"), gsm8k_reward(text, "42", strict=True)
    assert time.perf_counter() - start < 2.0


def test_bad_data_files_are_named_with_their_line(tmp_path, capsys):
    import json
    good = {"question": "Tom has 2 apples and buys 3 more. How many?", "answer": "2 + 3 = 5\n#### 5"}
    cases = {"no_answer": [good, {"question": "What?"}], "no_hashes": [good, good, {**good, "answer": "It is 5."}],
             "empty": []}
    messages = {"no_answer": "no_answer/train.jsonl: line 3: the record has no 'answer' text",
                "no_hashes": "no_hashes/train.jsonl: line 4: the answer has no final '#### <number>'",
                "empty": "empty/train.jsonl: no problems in this split"}
    for name, records in cases.items():
        (tmp_path / name).mkdir()
        lines = [json.dumps(record) for record in records]
        (tmp_path / name / "train.jsonl").write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n")  # a blank line
        (tmp_path / name / "test.jsonl").write_text(json.dumps(good) + "\n")
        with pytest.raises(SystemExit, match=messages[name]):
            reward.load_problems(str(tmp_path / name), "train")
    test = reward.load_problems(str(tmp_path / "empty"), "test")
    assert test == [good]


def solve_word_problem(question: str) -> int:
    """The answer of a generated problem read off its words, independently of how it was generated."""
    import re
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    if "gets" in question and "gives" in question:
        return numbers[0] + numbers[1] - numbers[2]
    if "gives" in question:
        return numbers[0] - numbers[1]
    if "Each pack has" in question:
        return numbers[0] * numbers[1]
    return sum(numbers)  # gets N more (and M more)


@pytest.mark.parametrize("name, kinds", [("easy", {"gives": 0, "Each pack": 0, "Monday": 0}),
                                         ("steps", {"Then": 0, "Each pack": 0, "Monday": 0})])
def test_word_problems_are_seeded_disjoint_and_right(name, kinds):
    train, test = reward.word_problems(name, "train"), reward.word_problems(name, "test")
    assert (len(train), len(test)) == (2000, 200)
    assert train == reward.word_problems(name, "train") and test == reward.word_problems(name, "test")  # seeded
    assert reward.word_problems(name, "test", seed=1) != test  # and the seed matters
    questions = [problem["question"] for problem in train + test]
    assert len(set(questions)) == len(questions)  # distinct, so no test question is in train
    for problem in train + test:
        expected = solve_word_problem(problem["question"])
        assert reward.reference_answer(problem["answer"]) == str(expected), problem
        assert gsm8k_reward(f"So the answer is \\boxed{{{expected}}}.", problem["answer"], strict=True) == 1.0
        two_steps = "Monday" in problem["question"] or "Then" in problem["question"]
        assert (reward.intermediate_result(problem["answer"]) is not None) == two_steps
        for word in kinds:
            kinds[word] += word in problem["question"]
    assert all(400 < count < 650 for count in kinds.values()), kinds  # the four kinds about equally often
    assert reward.load_problems(name, "test") == test  # --data easy/steps, checked like any other data
    assert reward.check_problems(train, name) == train


def test_a_missing_real_model_names_the_pip_packages(monkeypatch, tmp_path):
    import importlib.util
    from offline import smollm2
    real_find_spec = importlib.util.find_spec
    for absent in ("gguf", "accelerate"):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == absent else real_find_spec(name))
        with pytest.raises(SystemExit, match=f"needs [a-z ]*{absent}[a-z ]*\\. Install with:\n    pip install gguf accelerate"):
            smollm2.export_smollm2(str(tmp_path / "model"))
    assert not (tmp_path / "model").exists()


def test_ci_installs_the_readmes_cpu_route():
    here = Path(__file__).parent
    readme = (here / "README.md").read_text()
    block = readme.split("## Install")[1].split("```bash\n")[1].split("```")[0].strip().splitlines()
    assert block[0].startswith("python3 -m venv")
    cpu_route = [line.split("#")[0].strip() for line in block[1:]]  # the commands, without their comments
    ci = (here / ".ci" / "run").read_text()
    assert cpu_route[0].startswith("pip install torch==") and "--index-url" in cpu_route[0]
    for line in cpu_route:
        assert line.replace("pip install", "pip install -q") in ci


def test_curve_points_run_totals_of_tokens_and_seconds():
    from pictures import plots
    records = [{"step": 0, "eval_lenient": 0.2},
               {"step": 1, "tokens_generated": 100, "sample_s": 2.0, "loss_and_update_s": 1.0},
               {"step": 2, "tokens_generated": 50, "sample_s": 1.5, "loss_and_update_s": 0.5, "eval_lenient": 0.4,
                "eval_s": 9.0}]
    assert plots.curve_points(records, "eval_lenient", "step") == [(0, 0.2), (2, 0.4)]
    assert plots.curve_points(records, "eval_lenient", "tokens") == [(0, 0.2), (150, 0.4)]
    assert plots.curve_points(records, "eval_lenient", "seconds") == [(0.0, 0.2), (5.0, 0.4)]  # no eval_s
    assert plots.curve_points(records, "step_s", "step") == [(1, 3.0), (2, 2.0)]


def test_runs_are_labelled_by_method_and_seed(tmp_path):
    import json
    from pictures import plots
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "run.json").write_text(json.dumps({"method": "grpo", "width": 8, "seed": 2, "tau": 0.0}))
    assert plots.run_label(tmp_path / "a") == ("GRPO G=8 tau=0", 2)
    assert plots.run_label(tmp_path / "treerpo-s1") == ("treerpo", 1) and plots.run_label(tmp_path / "x") == ("x", None)


def test_every_picture_without_matplotlib_says_how_to_install_before_any_work(tmp_path, monkeypatch):
    import sys
    from pictures import draw_tree
    from probes import anatomy
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(draw_tree, "real_tree", lambda *args: pytest.fail("sampled a tree before the check"))
    monkeypatch.setattr(anatomy, "sample_scored", lambda *args, **kwargs: pytest.fail("sampled before the check"))
    for main, argv in ((draw_tree.main, ["out/smollm2", str(tmp_path / "tree.png")]),
                       (draw_tree.main, ["--tiny", str(tmp_path / "tree.png")]),
                       (anatomy.main, ["--model", "out/smollm2", "--out", str(tmp_path)])):
        with pytest.raises(SystemExit, match="^[^\n]* needs matplotlib, an optional dependency: pip install matplotlib$"):
            main(argv)


def test_the_anatomy_prints_its_table_without_matplotlib_or_out(tmp_path, monkeypatch, capsys):
    import sys
    from probes import anatomy
    tokenizer = byte_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    anatomy.main(["--model", str(tmp_path / "tiny"), "--widths", "2", "--questions", "2", "--segment-tokens", "4"])
    assert capsys.readouterr().out.splitlines()[-3].startswith("| N | trees | leaves/question")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny"]  # nothing written


# bench/bench.py ------------------------------------------------------------------------------------


def test_bench_quick_prints_one_json_line_of_figures():
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "bench.bench", "--quick"], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    for case in figures["results"]:
        assert case["ideal_tree_over_flat"] == pytest.approx((2 + 4) / (4 * 2))  # N=2, D=2
        assert case["tree"]["positions"] < case["reencode"]["positions"]  # the cache saves re-encoding
        assert case["loss_packed"]["positions_per_counted_token"] < case["loss"]["positions_per_counted_token"]
        assert case["tree"]["tokens"] == 2 * (2 + 4) * 4  # prompts x segments x L: no EOS at this vocab


def test_the_gpu_check_prints_one_json_line_and_runs_on_a_tiny_stand_in(capsys):
    """bench/gpu_check.py on the CPU with --tiny: every phase of each precision, the sampler's rate,
    bf16 against fp32; without its tokenizer folder, one line that says how to make it."""
    import json
    from bench import gpu_check
    gpu_check.main(["--tiny", "--device", "cpu", "--prompts", "2"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for dtype in ("fp32", "bf16"):
        assert set(figures[dtype]["phases"]) == {"sampling", "loss", "optimizer step", "evaluation"}
        assert figures[dtype]["tokens_generated"] > 0 and figures[dtype]["sampler_tokens_per_s"] > 0
    assert figures["bf16_over_fp32_step"] > 0 and figures["device"] == "cpu"
    with pytest.raises(SystemExit, match="--tokenizer nowhere: not a folder; make one first: python -m bench.gpu_check"):
        gpu_check.main(["--tokenizer", "nowhere", "--device", "cpu"])


def test_the_drawn_tree_has_a_box_a_node_coloured_by_advantage(tmp_path):
    """pictures.draw_tree: leaves one a row top to bottom, a parent level with the middle of its
    children; each box holds the segment, V and A (or "pruned"); green above 0, red below, grey pruned."""
    pytest.importorskip("matplotlib")
    from pictures import draw_tree
    tokenizer = byte_tokenizer()
    root = TreeNode(tokens=tokenizer("Q: 2+3?", add_special_tokens=False).input_ids)
    a = add(root, tokenizer(" 2+3 is\n5", add_special_tokens=False).input_ids)
    add(a, [65], 1.0), add(a, [66], 0.0)
    b = add(root, [67])
    add(b, [68], 0.0), add(b, [69], 0.0)
    assign_advantages(root)
    rows = draw_tree.node_rows(root)
    assert [rows[leaf] for leaf in leaves(root)] == [0, 1, 2, 3] and rows[a] == 0.5 and rows[root] == 1.5
    assert draw_tree.box_text(a, tokenizer, None) == "2+3 is ↵ 5\nV=0.50  A=+0.71"
    assert draw_tree.box_text(b.children[0], tokenizer, None).endswith("r=0  V=0.00  pruned")
    colours = lambda share: share  # noqa: E731  the colour map's position: 0 red, 0.5 neutral, 1 green
    assert draw_tree.box_colour(a, colours) > 0.5 > draw_tree.box_colour(b, colours)
    assert draw_tree.box_colour(b.children[0], colours) == "#d9d9d9" and draw_tree.box_colour(root, colours) == "white"
    draw_tree.draw_tree(root, tokenizer, str(tmp_path / "tree.png"), "a hand-made tree")
    assert (tmp_path / "tree.png").read_bytes()[:4] == b"\x89PNG"


def test_python_pictures_py_shows_five_pictures_of_one_tree(capsys):
    """`python -m pictures.tree_text`: the README's five pictures, offline, from a tiny random model (the
    README itself shows a real model's tree: tests/test_real.py checks that one)."""
    from pictures import tree_text as pictures
    pictures.main([])
    pictures = capsys.readouterr().out
    assert [line[:2] for line in pictures.splitlines() if line[:2] in ("1.", "2.", "3.", "4.", "5.")] == \
        ["1.", "2.", "3.", "4.", "5."]
    assert pictures.count("─ d3 ") == 4 * 8  # 2**3 leaves, in each of the four trees
    packed = [line for line in pictures.split("5. The loss")[1].splitlines() if " sees prompt" in line]
    assert packed and all(line.endswith("sees prompt") == (" d1 " in line) for line in packed)
    assert all(line.count(",") == 2 for line in packed if " d3 " in line)  # a leaf sees its path: prompt, d1, d2
    assert "A=+0.71" in pictures and "pruned" in pictures and "r=1" in pictures
