"""TreePO (arXiv 2508.17445) on treerpo.py's sampler: only what TreePO changes.

TreeRPO gives every node N children. TreePO grows a tree under a budget of W leaves per prompt,
with fixed-length segments, and spends what early finishers free on the paths still going:

    prompt ─┬─ a ─┬─ aa ── aaa  r=1      width W=4, divergence 2, max_depth 3
            │     └─ ab EOS     r=0      ab ended at depth 2: its share went to ba
            └─ b ─── ba ─┬─ baa r=1      b got one continuation (a unary chain), ba got two
                         └─ bab r=0

1. Budgeted branching (`sample_budgeted_trees`): each level, a prompt's active paths get
   total = min(W - finished, divergence * (active + finished_last_level)) continuations, at
   least one each, spread evenly. One batched `generate` per level, as in treerpo.py; unequal
   branching is a KV-cache row selection with repeated indices (a copy per extra row).
2. Early stop: a path ends on EOS, at max_depth, or when its text degenerates into repetition.
   Fallback: when every path of a prompt has ended with budget left, a random finished path is
   cut back at a random segment boundary and re-branched there (its prefix is re-encoded).
3. Credit (`assign_treepo_advantages`): per leaf, the mean over its ancestors a of
   R - mean(R of the leaves below a), then whitened over the batch. No sibling groups, no pruning.
4. Loss: each leaf path is trained with its score on every token (`path_trees`), so a shared
   prefix counts once per leaf; `weighted_trees` gives the same loss with each segment forwarded
   once, and the same `treerpo.backward_loss` trains it.
"""

import math
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from treerpo import (SampledLogprobs, TreeNode, add_children, cache_argument, check_branchable, check_count,
                     check_lengths, check_rows, check_sampling_args, encode_prompts, generate_settings, leaves, nodes,
                     pad_rows, path_from_root, response_tokens, reward_of, special_ids)


@dataclass(eq=False)
class BudgetedNode(TreeNode):
    """A TreeNode that also says why its path stopped, and whether fallback grew it."""
    stop: str = ""  # on a leaf: "eos", "depth" (max_depth reached) or "repetition"
    fallback: bool = False  # the first node of a branch that fallback re-grew from a segment boundary


# ----------------------------------------------------------------------------------------------
# 1-2. Sampling under a leaf budget


def allocate(budget_left: int, active: int, finished_last_level: int, divergence: int) -> list[int]:
    """Continuations for each of a prompt's `active` paths this level (the released `fixed_avg`).

    budget_left = W - the prompt's finished leaves. Each active path ends in at least one leaf,
    so budget_left >= active and every path gets at least one; the first paths get the remainder.

    >>> allocate(budget_left=7, active=3, finished_last_level=1, divergence=2)  # min(7, 2 * (3 + 1))
    [3, 2, 2]
    """
    total = max(active, min(budget_left, divergence * (active + finished_last_level)))
    return [total // active + (i < total % active) for i in range(active)]


def has_repetition(text: str, length: int = 32, count: int = 8) -> bool:
    """True when some `length`-character substring occurs `count` times (the released check)."""
    seen = Counter(text[i:i + length] for i in range(len(text) - length + 1))
    return bool(seen) and max(seen.values()) >= count


def sample_budgeted_trees(model, tokenizer, prompts: list[str], *, width: int, divergence: int = 2,
                          segment_tokens: int, max_depth: int, temperature: float = 1.0, top_p: float = 1.0,
                          do_sample: bool = True, return_logprobs: bool = False, repeat_length: int = 32,
                          repeat_count: int = 8, fallback: bool = True, max_rows: int = 4096) -> list[BudgetedNode]:
    """Sample one TreePO tree per prompt, at most `width` leaves each; returns the roots.

    Arguments as `treerpo.sample_trees`, plus: width, the leaf budget W; divergence, the
    continuations each active path asks for; repeat_length/repeat_count, the repetition stop
    (count 0: off); fallback, whether budget left when every path has ended is spent re-branching.
    max_rows caps prompts x width, the most rows a level can hold.
    """
    for name, count in (("width", width), ("divergence", divergence), ("max_depth", max_depth)):
        check_count(name, count)
    check_sampling_args(prompts, temperature, top_p, do_sample, 1, max_depth, segment_tokens, max_rows)
    check_rows(len(prompts) * width, max_rows, f"{len(prompts)} prompts x width {width}")
    pad_id, eos_ids = special_ids(model, tokenizer)
    roots = [BudgetedNode(tokens=tokenizer(prompt, add_special_tokens=False).input_ids) for prompt in prompts]
    check_lengths(model, [root.tokens for root in roots], max_depth * segment_tokens)
    generation = generate_settings(model, pad_id, eos_ids, temperature, top_p, do_sample) | {
        "max_new_tokens": segment_tokens}
    stop_rule = dict(max_depth=max_depth, eos_ids=eos_ids, repeat=(repeat_length, repeat_count), tokenizer=tokenizer)
    was_training = model.training
    model.eval()
    try:
        check_branchable(model, roots[0].tokens, generation, eos_ids)
        starts = roots
        while starts:  # the first phase grows from the prompts; later ones are fallback re-branches
            grow_budgeted(model, starts, width=width, divergence=divergence, pad_id=pad_id, stop_rule=stop_rule,
                          fallback=starts is not roots, logprob_temperature=temperature if return_logprobs else None,
                          **generation)
            starts = fallback_starts(roots, width, max_depth) if fallback else []
    finally:
        model.train(was_training)
    return roots


@torch.no_grad()
def grow_budgeted(model, starts, *, width, divergence, pad_id, stop_rule, fallback, logprob_temperature,
                  **generation):
    """Grow one phase, in place: from `starts` (one node in each of some trees) level by level,
    one batched `generate` a level, until every path of the phase has stopped. fallback: mark the
    phase's first nodes as fallback branches."""
    prefixes = [root_of(node).tokens + response_tokens(node) for node in starts]
    input_ids, attention_mask = pad_rows(prefixes, pad_id, side="left", device=model.device)  # (B, T)
    cache = encode_prompts(model, input_ids, attention_mask)  # each prefix encoded once
    frontier, finished_last = list(starts), {root_of(node): 0 for node in starts}
    while frontier:
        # Budget: how many continuations each frontier row gets; the rows repeat that often.
        counts = {}
        for tree in dict.fromkeys(root_of(node) for node in frontier):
            paths = [node for node in frontier if root_of(node) is tree]
            budget_left = width - sum(1 for leaf in leaves(tree) if leaf.stop)
            counts.update(zip(paths, allocate(budget_left, len(paths), finished_last[tree], divergence)))
        rows = torch.tensor([row for row, node in enumerate(frontier) for _ in range(counts[node])],
                            device=input_ids.device)
        cache.batch_select_indices(rows)  # repeated indices copy the rows: siblings never alias
        input_ids, attention_mask = input_ids[rows], attention_mask[rows]
        parents = [frontier[row] for row in rows.tolist()]

        recorder = SampledLogprobs(logprob_temperature) if logprob_temperature else None
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **cache_argument(model, cache),
                             logits_processor=LogitsProcessorList([recorder] if recorder else []),
                             return_dict_in_generate=True, **generation)
        new_tokens = out.sequences[:, input_ids.shape[1]:]  # (rows, W)
        logprobs = recorder.result(out.sequences) if recorder else None
        children = as_budgeted(add_children(parents, new_tokens, logprobs, stop_rule["eos_ids"],
                                            generation["max_new_tokens"]))
        for child in children:
            child.fallback = fallback and child.parent in starts

        keep = [row for row, child in enumerate(children) if not mark_stop(child, **stop_rule)]
        finished_last = {tree: 0 for tree in finished_last}
        for child in children:
            finished_last[root_of(child)] += bool(child.stop)
        if not keep:
            return
        keep_rows = torch.tensor(keep, device=input_ids.device)
        cache.batch_select_indices(keep_rows)
        input_ids = out.sequences[keep_rows]
        attention_mask = torch.cat([attention_mask, torch.ones_like(new_tokens)], dim=1)[keep_rows]
        frontier = [children[row] for row in keep]


def as_budgeted(children: list[TreeNode]) -> list[BudgetedNode]:
    """`add_children` makes TreeNodes; put BudgetedNodes with the same fields in their places."""
    budgeted = [BudgetedNode(**vars(child)) for child in children]
    for old, new in zip(children, budgeted):
        siblings = old.parent.children
        siblings[siblings.index(old)] = new
    return budgeted


def mark_stop(node: BudgetedNode, *, max_depth, eos_ids, repeat, tokenizer) -> bool:
    """Set `node.stop` if its path ends here (EOS, max_depth, repetition); True if it does."""
    length, count = repeat
    if node.finished:
        node.stop = "eos"
    elif count and has_repetition(tokenizer.decode(response_tokens(node)), length, count):
        node.stop = "repetition"
    elif node.depth >= max_depth:
        node.stop = "depth"
    return bool(node.stop)


def fallback_starts(roots, width: int, max_depth: int) -> list[BudgetedNode]:
    """For each tree with fewer than `width` leaves (called when all its paths have stopped): where
    to re-branch, a random segment boundary of a random finished path that leaves room below
    max_depth, or the root if none does. Empty when no tree has budget left."""
    starts = []
    for root in roots:
        if len(leaves(root)) >= width:
            continue
        path = path_from_root(random_choice(leaves(root)))
        boundaries = [node for node in path[:-1] if node.depth < max_depth]  # a cut that leaves room to grow
        starts.append(random_choice(boundaries) if boundaries else root)
    return starts


def random_choice(items):
    return items[int(torch.randint(len(items), (1,)))]  # torch's generator: torch.manual_seed decides


def root_of(node: TreeNode) -> TreeNode:
    while node.parent is not None:
        node = node.parent
    return node


# ----------------------------------------------------------------------------------------------
# 3-4. Credit per leaf path, and the rows the loss trains


def assign_treepo_advantages(roots: list[TreeNode], eps: float = 1e-8) -> None:
    """Fill `value` of every node (the mean reward of the leaves below it) and `advantage` of
    every leaf (its TreePO score); inner nodes keep advantage None. Leaf rewards must be set.

    score(leaf) = mean over the leaf's ancestors a, the root included, of R(leaf) - value(a),
                  skipping ancestors with a single leaf below (nothing to compare)
    advantage   = (score - mean) / sqrt(var + eps) over every leaf of the batch, each leaf weighted
                  by its response length (the released code whitens over tokens)
    """
    scored = []
    for root in roots:
        below = {node: leaves(node) for node in nodes(root)}
        for node, its_leaves in below.items():
            rewards = [reward_of(leaf) for leaf in its_leaves]
            node.value = sum(rewards) / len(rewards)
        for leaf in leaves(root):
            ancestors = [root] + path_from_root(leaf)[:-1]
            gaps = [leaf.value - node.value for node in ancestors if node is root or len(below[node]) > 1]
            scored.append((leaf, sum(gaps) / len(gaps), max(len(response_tokens(leaf)), 1)))
    weight = sum(tokens for _, _, tokens in scored)
    mean = sum(score * tokens for _, score, tokens in scored) / weight
    variance = sum((score - mean) ** 2 * tokens for _, score, tokens in scored) / max(weight - 1, 1)
    for leaf, score, _ in scored:
        leaf.advantage = (score - mean) / math.sqrt(variance + eps)
        if not math.isfinite(leaf.advantage):  # e.g. rewards near 1e308 overflow the mean
            raise ValueError(f"a leaf at depth {leaf.depth} has a non-finite advantage: rewards this large overflow; "
                             "scale them down")


def path_trees(roots: list[TreeNode]) -> list[TreeNode]:
    """The trees as `treerpo.backward_loss` should train them for TreePO: under a copy of each root,
    one chain of node copies per leaf, every node carrying its leaf's advantage. Each leaf path
    becomes one row with its score on every token, and a shared prefix counts once per leaf."""
    chains = []
    for root in roots:
        chain_root = TreeNode(tokens=root.tokens, value=root.value)
        for leaf in leaves(root):
            parent = chain_root
            for node in path_from_root(leaf):
                child = TreeNode(tokens=node.tokens, parent=parent, depth=node.depth, finished=node.finished,
                                 logprobs=node.logprobs, value=leaf.value, advantage=leaf.advantage)
                parent.children.append(child)
                parent = child
        chains.append(chain_root)
    return chains


def weighted_trees(roots: list[TreeNode]) -> list[TreeNode]:
    """The trees as the loss trains them for TreePO, each segment once: a copy of each tree whose
    nodes carry the mean advantage of the leaves below them and weight = how many leaves that is.

    This is `path_trees`' loss and gradient at a fraction of the tokens. A token shared by k leaf
    paths is trained k times there, once with each leaf's score A_i; here once, with weight k at
    their mean, which is the same sum, k * mean(A_i) = sum(A_i), as long as the PPO clip is inactive
    (one update per batch: the ratio is 1). `test_weighted_trees_train_as_the_leaf_paths` checks it.
    """
    return [_weighted_copy(root, parent=None) for root in roots]


def _weighted_copy(node: TreeNode, parent: TreeNode | None) -> TreeNode:
    below = leaves(node)
    copy = TreeNode(tokens=node.tokens, parent=parent, depth=node.depth, finished=node.finished,
                    logprobs=node.logprobs, value=node.value, weight=len(below),
                    advantage=None if parent is None else sum(leaf.advantage for leaf in below) / len(below))
    copy.children = [_weighted_copy(child, copy) for child in node.children]
    return copy
