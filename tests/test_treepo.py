"""Tests for treepo.py (TreePO on treerpo.py's sampler): CPU, offline, tiny random models."""

import doctest
import math

import pytest
import torch

import treepo
from test_treerpo import PROMPTS, eos_biased, greedy_reference, teacher_forced
from offline.tiny import byte_tokenizer, tiny_model
from pictures.tree_text import format_budgeted_tree
from treepo import (BudgetedNode, allocate, assign_treepo_advantages, has_repetition,
                    path_trees, sample_budgeted_trees)
from treerpo import backward_loss, leaf_path_rows, leaves, nodes, response_tokens, sample_trees


TOKENIZER = byte_tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return TOKENIZER


def encode(text):
    return TOKENIZER(text, add_special_tokens=False).input_ids


def budgeted(model, tokenizer, seed=0, prompts=PROMPTS, **kwargs):
    torch.manual_seed(seed)
    arguments = dict(width=6, segment_tokens=3, max_depth=3) | kwargs
    return sample_budgeted_trees(model, tokenizer, prompts, **arguments)


def stopped_paths(root):
    return [leaf for leaf in leaves(root) if leaf.stop]


# 1. The budget --------------------------------------------------------------------------------


def test_allocate_spreads_evenly_and_gives_every_path_one():
    assert allocate(budget_left=8, active=1, finished_last_level=0, divergence=2) == [2]
    assert allocate(budget_left=8, active=4, finished_last_level=0, divergence=2) == [2, 2, 2, 2]
    assert allocate(budget_left=7, active=3, finished_last_level=1, divergence=2) == [3, 2, 2]  # 1's share moves
    assert allocate(budget_left=3, active=3, finished_last_level=0, divergence=2) == [1, 1, 1]  # budget spent
    assert allocate(budget_left=64, active=16, finished_last_level=0, divergence=4) == [4] * 16


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("width, eos_bias", [(4, 3.0), (6, 3.0), (9, 0.0), (5, 5.0)])
def test_budget_invariants(tokenizer, seed, width, eos_bias):
    """Never more than W leaves; with fallback exactly W; every unstopped path below max_depth goes
    on; each level spends min(W - finished, divergence * (active + finished_last_level))."""
    model = eos_biased(tiny_model(len(tokenizer), seed=seed), tokenizer, eos_bias)
    for fallback in (False, True):
        roots = budgeted(model, tokenizer, seed, width=width, fallback=fallback)
        for root in roots:
            count = len(leaves(root))
            assert count == width if fallback else count <= width
            for node in nodes(root)[1:]:
                assert bool(node.children) != bool(node.stop)  # a node goes on exactly when it did not stop
                assert node.stop != "depth" or node.depth == 3
            if not fallback:
                check_level_budgets(root, width, divergence=2)


def check_level_budgets(root, width, divergence):
    """Replay the levels of one tree grown without fallback and check each level's total."""
    frontier, finished, finished_last = [root], 0, 0
    while frontier:
        children = [child for node in frontier for child in node.children]
        assert len(children) == max(len(frontier), min(width - finished, divergence * (len(frontier) + finished_last)))
        assert all(node.children for node in frontier)  # every active path continues
        finished_last = sum(1 for child in children if child.stop)
        finished += finished_last
        frontier = [child for child in children if not child.stop]


def test_freed_budget_reaches_the_survivors(tokenizer):
    """Find a level where some paths ended: the survivors then get more than `divergence` each on
    average, where a full binary tree would give them exactly 2."""
    model = eos_biased(tiny_model(len(tokenizer), seed=1), tokenizer, 3.0)
    found = False
    for seed in range(10):
        for root in budgeted(model, tokenizer, seed, width=16, max_depth=4, fallback=False):
            for level in range(1, 3):
                parents = [node for node in nodes(root) if node.depth == level]
                survivors = [node for node in parents if node.children]
                if survivors and len(survivors) < len(parents):
                    children = sum(len(node.children) for node in survivors)
                    found |= children > 2 * len(survivors)
    assert found


def test_full_width_without_early_stops_is_treerpos_full_tree(tokenizer):
    model = tiny_model(len(tokenizer))  # no EOS in 3 x 3 tokens here, and no repetition
    shape = lambda roots: [[len(node.children) for node in nodes(root)] for root in roots]  # noqa: E731
    tree_po = budgeted(model, tokenizer, width=3 ** 3, divergence=3, repeat_count=0)
    tree_rpo = sample_trees(model, tokenizer, PROMPTS, branch=3, depth=3, segment_tokens=3)
    assert shape(tree_po) == shape(tree_rpo)
    assert not any(node.fallback for root in tree_po for node in nodes(root))


# 2. What it samples -----------------------------------------------------------------------------


@pytest.mark.parametrize("eos_bias", [0.0, 3.0])
def test_greedy_paths_equal_plain_generate(tokenizer, eos_bias):
    """Every leaf path, fallback branches included, is what plain greedy `generate` writes."""
    model = eos_biased(tiny_model(len(tokenizer), arch="llama"), tokenizer, eos_bias)
    roots = budgeted(model, tokenizer, width=5, do_sample=False, repeat_count=0)
    for root, prompt in zip(roots, PROMPTS):
        reference = greedy_reference(model, tokenizer, prompt, 3 * 3)
        for leaf in leaves(root):
            path = response_tokens(leaf)
            assert path == reference[:len(path)]
            assert leaf.stop == ("eos" if leaf.finished else "depth")


def test_sampled_logprobs_equal_teacher_forcing(tokenizer):
    """Also on fallback branches, whose prefixes are re-encoded in a batch of their own."""
    model = eos_biased(tiny_model(len(tokenizer)), tokenizer, 3.0)
    roots = budgeted(model, tokenizer, width=12, temperature=0.7, return_logprobs=True)  # > 2**3: fallback
    assert any(node.fallback for root in roots for node in nodes(root))  # the case is exercised
    for root in roots:
        for node in nodes(root)[1:]:
            assert node.logprobs == pytest.approx(teacher_forced(model, root, node, 0.7).tolist(), abs=1e-4)


def test_repetition_check():
    assert has_repetition("ab" * 200, length=32, count=8)
    assert not has_repetition("the quick brown fox jumps over the lazy dog. " * 2, length=32, count=8)
    assert not has_repetition("", 32, 8) and not has_repetition("x" * 31, 32, 8)
    assert has_repetition("x" * 39, 32, 8) and not has_repetition("x" * 38, 32, 8)  # 8 windows vs 7


def test_early_stop_on_eos_and_on_repetition(tokenizer):
    model = tiny_model(len(tokenizer), init_std=0.02)  # near-flat logits: greedy repeats one token
    roots = budgeted(model, tokenizer, width=4, do_sample=False, segment_tokens=4, max_depth=5,
                     repeat_length=4, repeat_count=3, fallback=False)
    for root in roots:
        for leaf in leaves(root):
            assert leaf.stop == "repetition" and leaf.depth < 5  # stopped before max_depth
            assert has_repetition(tokenizer.decode(response_tokens(leaf)), 4, 3)
            assert not has_repetition(tokenizer.decode(response_tokens(leaf.parent)), 4, 3) or leaf.depth == 1
    eos_model = eos_biased(tiny_model(len(tokenizer)), tokenizer, 5.0)
    eos_leaves = [leaf for root in budgeted(eos_model, tokenizer) for leaf in leaves(root) if leaf.finished]
    assert eos_leaves and all(leaf.stop == "eos" and leaf.tokens[-1] == tokenizer.eos_token_id for leaf in eos_leaves)


def test_fallback_fires_only_when_every_path_ended_and_branches_at_a_segment_boundary(tokenizer, monkeypatch):
    calls = []
    original = treepo.fallback_starts

    def spy(roots, width, max_depth):
        starts = original(roots, width, max_depth)
        for start in starts:
            tree = treepo.root_of(start)
            assert all(leaf.stop for leaf in leaves(tree)) and len(leaves(tree)) < width  # all ended, budget left
            # a segment boundary of an existing path: the root, or an inner node with room below it
            assert start is tree or (start.children and start.depth < max_depth)
        calls.append(len(starts))
        return starts
    monkeypatch.setattr(treepo, "fallback_starts", spy)
    model = eos_biased(tiny_model(len(tokenizer)), tokenizer, 4.0)
    roots = budgeted(model, tokenizer, width=12)  # more than 2 ** max_depth: fallback must fire
    assert calls[-1] == 0 and sum(calls) > 0
    for root in roots:
        for node in nodes(root)[1:]:
            if node.fallback:  # a sibling of what was there before: it was re-branched, not appended
                assert len(node.parent.children) >= 2 and not node.parent.children[0].fallback
    no_early_stops = budgeted(tiny_model(len(tokenizer)), tokenizer, width=8, divergence=2, repeat_count=0)
    assert calls[-1] == 0 and not any(node.fallback for root in no_early_stops for node in nodes(root))


def test_bad_arguments_are_refused(tokenizer):
    model = tiny_model(len(tokenizer))
    for name, value in (("width", 0), ("divergence", 0), ("max_depth", 0), ("segment_tokens", 0), ("width", True)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            budgeted(model, tokenizer, **{name: value})


# 3-4. Credit and the loss ---------------------------------------------------------------------


def add(parent, name, reward=None):
    """A hand-built node of one token, the last letter of its name."""
    child = BudgetedNode(tokens=encode(name[-1]), parent=parent, depth=parent.depth + 1, reward=reward,
                         finished=reward is not None, stop="" if reward is None else "eos")
    parent.children.append(child)
    return child


def uneven_tree():
    """root ─┬─ a ─┬─ aa r=1             V(root) = 4/7, V(a) = 1/2
             │     └─ ab r=0
             ├─ b ── ba ─┬─ baa r=1      V(b) = V(ba) = 2/3 (b: a unary chain)
             │           ├─ bab r=1
             │           └─ bac r=0
             ├─ c r=0
             └─ d ── da r=1              V(d) = 1: one leaf below, skipped
    """
    root = BudgetedNode(tokens=encode("Q?"))
    a, b = add(root, "a"), add(root, "b")
    add(a, "aa", 1.0), add(a, "ab", 0.0)
    ba = add(b, "ba")
    add(ba, "baa", 1.0), add(ba, "bab", 1.0), add(ba, "bac", 0.0)
    add(root, "c", 0.0)
    add(add(root, "d"), "da", 1.0)
    return root


def test_advantages_on_an_uneven_tree_by_hand():
    root = uneven_tree()
    assign_treepo_advantages([root])
    #                aa: root, a     ab          baa/bab: root, b, ba        bac                 c     da: root
    scores = [(3 / 7 + 1 / 2) / 2, (-4 / 7 - 1 / 2) / 2, (3 / 7 + 1 / 3 + 1 / 3) / 3, (3 / 7 + 1 / 3 + 1 / 3) / 3,
              (-4 / 7 - 2 / 3 - 2 / 3) / 3, -4 / 7, 3 / 7]
    assert scores[:2] == pytest.approx([13 / 28, -15 / 28]) and scores[4] == pytest.approx(-40 / 63)
    lengths = [2, 2, 3, 3, 3, 1, 2]  # tokens of each leaf's path: whitening weighs leaves by length
    mean = sum(s * n for s, n in zip(scores, lengths)) / sum(lengths)
    variance = sum((s - mean) ** 2 * n for s, n in zip(scores, lengths)) / (sum(lengths) - 1)
    expected = [(s - mean) / math.sqrt(variance + 1e-8) for s in scores]
    assert [leaf.advantage for leaf in leaves(root)] == pytest.approx(expected, abs=1e-9)
    assert [node.value for node in nodes(root)][:3] == pytest.approx([4 / 7, 1 / 2, 1.0])
    assert all(node.advantage is None for node in nodes(root) if node.children)  # no per-step credit


def test_whitening_spans_the_batch_and_equal_rewards_give_no_nan():
    same = [uneven_tree(), uneven_tree()]
    for leaf in leaves(same[0]) + leaves(same[1]):
        leaf.reward = 1.0
    assign_treepo_advantages(same)
    assert all(leaf.advantage == 0.0 for root in same for leaf in leaves(root))
    one, two = uneven_tree(), uneven_tree()
    for leaf in leaves(two):
        leaf.reward = 1.0  # the second tree: no signal of its own, only the batch's mean
    assign_treepo_advantages([one, two])
    alone = uneven_tree()
    assign_treepo_advantages([alone])
    assert [leaf.advantage for leaf in leaves(one)] != pytest.approx([leaf.advantage for leaf in leaves(alone)])
    bad = uneven_tree()
    leaves(bad)[0].reward = math.nan
    with pytest.raises(ValueError, match="has reward nan"):
        assign_treepo_advantages([bad])


def test_each_leaf_path_is_a_row_with_its_score_on_every_token(tokenizer):
    root = uneven_tree()
    assign_treepo_advantages([root])
    (chains,) = path_trees([root])
    rows = leaf_path_rows(chains)
    assert len(rows) == len(leaves(root))
    for row, leaf in zip(rows, leaves(root)):
        response = len(response_tokens(leaf))
        assert row["tokens"] == root.tokens + response_tokens(leaf)
        assert row["weights"] == [0] * 2 + [1] * response  # a shared prefix counts in every row
        assert row["advantages"][2:] == [leaf.advantage] * response
    model = tiny_model(len(tokenizer))
    loss, stats = backward_loss(model, [chains])
    assert stats["tokens"] == sum(len(response_tokens(leaf)) for leaf in leaves(root)) == 16
    expected = -sum(leaf.advantage * len(response_tokens(leaf)) for leaf in leaves(root)) / 16  # on-policy: -mean A
    assert loss == pytest.approx(expected, abs=1e-6)


def test_weighted_trees_train_as_the_leaf_paths(tokenizer):
    """Each segment once with weight = its leaves and their mean score: the leaf-path rows' loss
    and gradient (TreePO trains every leaf path with its own score), packed or not."""
    model = eos_biased(tiny_model(len(tokenizer)), tokenizer)
    roots = budgeted(model, tokenizer, return_logprobs=True)
    for number, leaf in enumerate(leaf for root in roots for leaf in leaves(root)):
        leaf.reward = float(number % 3 == 0)
    assign_treepo_advantages(roots)
    results = []
    for trained, packed in ((path_trees(roots), False), (treepo.weighted_trees(roots), True),
                            (treepo.weighted_trees(roots), False)):
        model.zero_grad()
        loss, stats = backward_loss(model, trained, packed=packed)
        results.append((loss, stats, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (loss, stats, grads), *others = results
    assert stats["clip_fraction"] == 0.0 and grads.abs().sum() > 0
    assert others[0][1]["positions"] < stats["positions"]  # packed: each segment forwarded once
    for other_loss, other_stats, other_grads in others:
        assert other_stats["tokens"] == stats["tokens"]
        assert other_loss == pytest.approx(loss, abs=1e-6)
        torch.testing.assert_close(other_grads, grads, atol=1e-6, rtol=1e-4)
    inner = [node for root in treepo.weighted_trees(roots) for node in nodes(root)[1:] if node.children]
    assert any(node.weight > 1 for node in inner)  # the trees do share prefixes


def test_format_budgeted_tree(tokenizer):
    root = uneven_tree()
    for leaf, stop in ((leaves(root)[0], "depth"), (leaves(root)[-1], "repetition")):
        leaf.stop, leaf.finished = stop, False
    leaves(root)[-1].parent.fallback = True
    assign_treepo_advantages([root])
    assert format_budgeted_tree(root, tokenizer) == "\n".join([
        'prompt (2 tokens) "Q?"  V=0.57',
        '├─ d1 "a"  V=0.50',
        '│  ├─ d2 "a"  r=1  V=1.00  depth  A=+0.88',
        '│  └─ d2 "b"  EOS  r=0  V=0.00  A=-1.13',
        '├─ d1 "b"  V=0.67',
        '│  └─ d2 "a"  V=0.67',
        '│     ├─ d3 "a"  EOS  r=1  V=1.00  A=+0.68',
        '│     ├─ d3 "b"  EOS  r=1  V=1.00  A=+0.68',
        '│     └─ d3 "c"  EOS  r=0  V=0.00  A=-1.33',
        '├─ d1 "c"  EOS  r=0  V=0.00  A=-1.21',
        '└─ d1 "d"  V=1.00  fallback',
        '   └─ d2 "a"  r=1  V=1.00  repetition  A=+0.81'])


def test_doctests():
    assert doctest.testmod(treepo).failed == 0


# The training script --------------------------------------------------------------------------
