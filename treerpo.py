"""TreeRPO: Tree Relative Policy Optimization, in one file (arXiv 2506.05183).

TreeRPO is GRPO with a tree instead of a flat group. For each prompt it samples a tree whose
nodes are segments of at most L generated tokens; every node gets N fresh continuations:

    prompt ─┬─ a ─┬─ aa → r=1        branch N=2, depth D=2
            │     └─ ab → r=0        V(a) = mean(1, 0) = 0.5      A(a)  = -0.71
            └─ b ─┬─ ba → r=1        V(b) = mean(1, 1) = 1.0      A(b)  = +0.71
                  └─ bb → r=1        {ba, bb} all equal: pruned   A(aa) = +0.71, A(ab) = -0.71

1. Sample (`sample_trees`): the prompt is encoded once; to branch, a node's KV cache is copied
   N times and generation goes on for L more tokens. A segment that ends in EOS is a leaf.
2. Score (`assign_advantages`): each leaf gets the verifier's reward for its whole path; a node's
   value V is the mean of its children's values, an estimate of the reward expected from it.
3. Advantage: the N siblings under one parent form a group, like GRPO's G answers to one prompt:
   A = (V - mean) / std over the group. Groups whose values span less than tau are dropped.
4. Loss (`backward_loss`): each kept node's segment is trained with PPO-clip, every token weighted
   by its node's A; a segment shared by many leaves counts once. By default each tree is packed
   into one row under a tree attention mask, so every token is also forwarded once.

With depth=1 the tree is N independent answers to the prompt and TreeRPO is exactly GRPO. The
sections below follow these steps; the checks and model switches come last. Any Hugging Face
causal LM runs: what a model can do is measured on a few of its own tokens, not read off its name.
"""

import contextlib
import inspect
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

NORMS = ("std", "bernoulli", "none")
ROOT_TERMS = (None, "treerl", "grpo")


# ----------------------------------------------------------------------------------------------
# The tree


@dataclass(eq=False)  # eq=False: nodes compare (and hash) by identity, as tree nodes should
class TreeNode:
    tokens: list[int]  # root: the prompt's token ids; any other node: its segment's token ids
    parent: "TreeNode | None" = field(default=None, repr=False)
    children: list["TreeNode"] = field(default_factory=list)
    depth: int = 0  # root = 0, its children = 1, ...
    finished: bool = False  # the segment ended in EOS, so the node is a leaf
    logprobs: list[float] | None = None  # sampling-time log p of each segment token (if asked)
    reward: float | None = None  # leaves only: the verifier's reward, set by the caller
    value: float | None = None  # mean of the children's values (a leaf: its reward)
    advantage: float | None = None  # None at the root and for the nodes of a pruned group
    weight: int = 1  # how many times the loss counts each token (TreePO: once per leaf below)


def nodes(root: TreeNode) -> list[TreeNode]:
    """Every node under `root`, `root` included, depth-first (parents before children)."""
    return [root] + [node for child in root.children for node in nodes(child)]


def leaves(root: TreeNode) -> list[TreeNode]:
    """The leaves under `root`, left to right."""
    return [node for node in nodes(root) if not node.children]


def path_from_root(node: TreeNode) -> list[TreeNode]:
    """The generated nodes from the root down to `node`: [depth-1 node, ..., node]."""
    return path_from_root(node.parent) + [node] if node.parent is not None else []


def response_tokens(node: TreeNode) -> list[int]:
    """The tokens generated from the prompt down to `node`: its ancestors' segments, then its own."""
    return [token for step in path_from_root(node) for token in step.tokens]


# ----------------------------------------------------------------------------------------------
# 1. Sampling: one batched `generate` call per level, branching by copying the KV cache


def sample_trees(model, tokenizer, prompts: list[str], *, branch: int | list[int], depth: int,
                 segment_tokens: int | list[int], temperature: float = 1.0, top_p: float = 1.0,
                 do_sample: bool = True, return_logprobs: bool = False, max_rows: int = 4096) -> list[TreeNode]:
    """Sample one tree per prompt; returns the roots. Runs in eval mode (restored after), without grad.

    prompts: templated text, tokenized without special tokens (a chat template writes its own BOS).
    Every node has `branch` children until `depth`, or until its segment ends in an EOS (the tokenizer's
    or the model's generation_config's). branch, segment_tokens: one number, or one a level ([8, 2]).
    return_logprobs: record each token's log p under softmax(logits / temperature), as the loss takes it.
    max_rows: refuse a tree whose last level could need more rows (prompts x branch ** depth)."""
    branches, segments = check_sampling_args(prompts, temperature, top_p, do_sample, branch, depth, segment_tokens,
                                             max_rows)
    pad_id, eos_ids = special_ids(model, tokenizer)
    prompt_ids = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    check_lengths(model, prompt_ids, sum(segments))
    generation = generate_settings(model, pad_id, eos_ids, temperature, top_p, do_sample)
    roots = [TreeNode(tokens=ids) for ids in prompt_ids]
    input_ids, attention_mask = pad_rows(prompt_ids, pad_id, side="left", device=model.device)  # (B, P)
    was_training = model.training
    model.eval()  # sampling is inference: no dropout, and gradient checkpointing would turn the cache off
    try:
        check_branchable(model, prompt_ids[0], generation, eos_ids)
        grow_trees(model, roots, input_ids, attention_mask, branches=branches, segments=segments, eos_ids=eos_ids,
                   logprob_temperature=temperature if return_logprobs else None, **generation)
    finally:
        model.train(was_training)
    return roots


@torch.no_grad()
def grow_trees(model, roots, input_ids, attention_mask, *, branches, segments, eos_ids, logprob_temperature,
               **generation):
    """Add a level of children under `roots` for each of `branches` and `segments`, in place.
    input_ids, attention_mask: (B, P), the left-padded prompts; generation: `generate`'s keywords."""
    frontier = roots  # the nodes whose children the next level samples, one row each
    cache = encode_prompts(model, input_ids, attention_mask)
    for level, (branch, segment_tokens) in enumerate(zip(branches, segments), start=1):
        # Branch: each frontier row becomes `branch` rows with copies of its cache.
        cache.batch_repeat_interleave(branch)  # copies the storage: siblings never alias
        input_ids = input_ids.repeat_interleave(branch, dim=0)  # (rows * N, T)
        attention_mask = attention_mask.repeat_interleave(branch, dim=0)
        parents = [node for node in frontier for _ in range(branch)]

        recorder = SampledLogprobs(logprob_temperature) if logprob_temperature else None
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **cache_argument(model, cache),
                             logits_processor=LogitsProcessorList([recorder] if recorder else []),
                             return_dict_in_generate=True, max_new_tokens=segment_tokens, **generation)
        new_tokens = out.sequences[:, input_ids.shape[1]:]  # (rows, W), W < L only if every row hit EOS
        logprobs = recorder.result(out.sequences) if recorder else None  # (rows, W)
        children = add_children(parents, new_tokens, logprobs, eos_ids, segment_tokens)

        # Only unfinished rows go on: a finished row's tail is pads that must not be continued.
        keep = [row for row, child in enumerate(children) if not child.finished]
        if level == len(branches) or not keep:
            return
        keep_rows = torch.tensor(keep, device=input_ids.device)
        cache.batch_select_indices(keep_rows)
        input_ids = out.sequences[keep_rows]
        attention_mask = torch.cat([attention_mask, torch.ones_like(new_tokens)], dim=1)[keep_rows]
        frontier = [children[row] for row in keep]


def encode_prompts(model, input_ids, attention_mask) -> DynamicCache:
    """A cache of every prompt token but the last (input_ids, attention_mask: (B, P)). `generate` feeds
    only what the cache has not seen, and needs the last token's logits to draw the first new one."""
    cache = DynamicCache(config=model.config)
    if input_ids.shape[1] > 1:  # logits_to_keep=1: skip (B, P, vocab) logits nobody reads
        model(input_ids[:, :-1], attention_mask=attention_mask[:, :-1], use_cache=True,
              position_ids=position_ids(attention_mask[:, :-1]), **cache_argument(model, cache),
              **logits_to_keep(model, 1), **no_router_logits(model))
    return cache


def add_children(parents, new_tokens, logprobs, eos_ids, segment_tokens) -> list[TreeNode]:
    """Attach row r of `new_tokens` (rows, W) as a child of parents[r]; returns the children. A segment
    runs up to and including its first EOS (the model's decision to stop); generate's padding is dropped."""
    children = []
    for row, parent in enumerate(parents):
        tokens = new_tokens[row].tolist()
        eos_at = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
        length = eos_at + 1 if eos_at is not None else len(tokens)
        if eos_at is None and length < segment_tokens:  # pads would become tokens: refuse, loudly
            raise RuntimeError("generate stopped a row before EOS and before segment_tokens; "
                               "check the model's generation_config (stop_strings, max_length)")
        child = TreeNode(tokens=tokens[:length], parent=parent, depth=parent.depth + 1, finished=eos_at is not None,
                         logprobs=logprobs[row, :length].tolist() if logprobs is not None else None)
        parent.children.append(child)
        children.append(child)
    return children


# ----------------------------------------------------------------------------------------------
# 2-3. Node values and step-level group advantages


def assign_advantages(root: TreeNode, *, norm: str = "std", tau: float = 0.1, eps: float = 1e-6,
                      root_term: str | None = None) -> None:
    """Fill `value` and `advantage` of every node under `root`. Leaf rewards must be set.

    value:     V(leaf) = reward;  V(node) = mean of V(child) over its children (no discount)
    advantage: for each group S of siblings, A(v) = group_advantages(S)[v], or None for every
               node of the group when max S - min S < tau (the group carries no signal).
    root_term: None (TreeRPO as published), or also compare each node v with the whole question,
               so that a tied group under a good opening still trains (n: the leaves under v):
        "treerl": A(v) = (V(v) - V(root) + V(v) - V(parent)) / sqrt(n)   (TreeRL, AttnRL; norm, tau unused)
        "grpo":   A(v) = (V(v) - V(root)) / std(the tree's leaf rewards) + the sibling A above (0 if tied)
                  (Tree-GRPO's GRPO over the question's answers plus one within each group)
        Both set weight = n: the sources train every leaf's path, a shared segment once per leaf below it.
        A node whose A is 0 is not trained (None).
    """
    if norm not in NORMS or root_term not in ROOT_TERMS:
        raise ValueError(f"norm must be one of {NORMS} and root_term one of {ROOT_TERMS}, got {norm!r}, {root_term!r}")
    assign_values(root)
    root.advantage = None  # the root has no siblings
    for group in [node.children for node in nodes(root) if node.children]:
        values = [child.value for child in group]
        advantages = [None] * len(group) if max(values) - min(values) < tau else group_advantages(values, norm, eps)
        if not all(math.isfinite(advantage) for advantage in advantages if advantage is not None):
            raise ValueError(f"the children of a depth-{group[0].depth - 1} node have values {values} and "
                             "non-finite advantages: rewards this large overflow; scale them down")
        for child, advantage in zip(group, advantages):
            child.advantage = advantage
    if root_term is not None:
        add_root_term(root, root_term, eps)


def assign_values(node: TreeNode) -> float:
    """V(leaf) = its reward, V(node) = the mean of its children's V, set under `node`; returns V(node)."""
    values = [assign_values(child) for child in node.children] or [reward_of(node)]
    node.value = sum(values) / len(values)
    return node.value


def group_advantages(values: list[float], norm: str = "std", eps: float = 1e-6) -> list[float]:
    """GRPO's advantages for one group of sibling values (a pair gets +-0.71 under std, whatever its gap).

    std:       A = (V - mean) / (std + eps), std with Bessel's correction (as torch.std, TRL's GRPO)
    bernoulli: A = (V - mean) / (mean (1 - mean) + eps): the Bernoulli variance, not its std (a choice)
    none:      A = V - mean

    >>> [round(a, 3) for a in group_advantages([1.0, 0.0, 0.0, 1.0])]
    [0.866, -0.866, -0.866, 0.866]
    >>> [round(a, 3) for a in group_advantages([1.0, 0.0, 0.0, 0.0], norm="bernoulli")]
    [4.0, -1.333, -1.333, -1.333]
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    mean, std = mean_and_std(values)
    scale = {"std": std + eps, "bernoulli": mean * (1 - mean) + eps, "none": 1.0}[norm]
    return [(value - mean) / scale for value in values]


def add_root_term(root: TreeNode, form: str, eps: float = 1e-6) -> None:
    """The root term of `assign_advantages` (its docstring), on a tree with values and sibling advantages."""
    scale = mean_and_std([leaf.value for leaf in leaves(root)])[1] + eps if form == "grpo" else 1.0
    for node in nodes(root)[1:]:
        below = len(leaves(node))
        if form == "treerl":
            advantage = (node.value - root.value + node.value - node.parent.value) / math.sqrt(below)
        else:
            advantage = (node.value - root.value) / scale + (node.advantage or 0.0)
        node.advantage, node.weight = (advantage if abs(advantage) > 1e-9 else None), below


def scale_by_step(roots: list[TreeNode], eps: float = 1e-6) -> None:
    """The "step" norm: after assign_advantages(root, norm="none") on a step's trees, divide every kept
    advantage by their root mean square over the step. Under std, (0.25, 0, 0, 0) and (1, 0, 0, 0) give
    their first node the same +1.5; here the second gets 4x the first, and the scale stays 1."""
    kept = [node for root in roots for node in nodes(root)[1:] if node.advantage is not None]
    scale = math.sqrt(sum(node.advantage ** 2 for node in kept) / max(len(kept), 1))
    for node in kept:
        node.advantage /= scale + eps


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation with Bessel's correction (as torch.std); std 0 for one value."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / max(len(values) - 1, 1))


# ----------------------------------------------------------------------------------------------
# 4. The loss: PPO-clip on every kept node's tokens, each node counted once


def backward_loss(model, trees: list[TreeNode], *, ref_model=None, kl_coef: float = 0.0, clip_eps: float = 0.2,
                  temperature: float = 1.0, packed: bool | None = None, max_row_tokens: int = 4096,
                  micro_batch_size: int = 8, total_tokens: float | None = None,
                  keep_logprobs: bool = False) -> tuple[float, dict]:
    """The TreeRPO loss over scored trees, back-propagated forward by forward (memory holds one forward's
    activations); the caller clips the gradient and steps the optimizer. Returns (loss, stats).

    The loss is the weighted mean over the counted tokens. What a caller must get right:
    temperature: the one sampled at (log-probs are taken under softmax(logits / T));
    ref_model (kl_coef > 0): a frozen copy of the start that computes as the policy does, e.g.
        copy.deepcopy(model).requires_grad_(False); and the model's dropout off, as when it sampled.
    Old log-probs (PPO's ratio) are each node's `logprobs`; where none are set the ratio is exactly 1.
    keep_logprobs: write this pass's log-probs into the trained nodes, the old ones of later passes.
    packed: True trains `packed_rows` (a tree mask, rows of at most max_row_tokens); False trains
        `leaf_path_rows` (micro_batch_size a forward); None: packed where `can_pack` measures it right.
    total_tokens: the divisor, by default `counted_tokens(trees)` (data-parallel: the whole batch's)."""
    check_loss_args(trees, ref_model, kl_coef, temperature, micro_batch_size, max_row_tokens)
    models = [model] + ([ref_model] if kl_coef else [])
    packed = can_pack(models, trees, packed, model.device)
    heads = [plain_output_head(each, trees, model.device) for each in models]  # chunked where exactly head(hidden)
    if packed:
        batches = [[row] for root in trees for row in packed_rows(root, max_row_tokens)]
    else:
        rows = sorted((row for root in trees for row in leaf_path_rows(root)), key=lambda row: len(row["tokens"]))
        batches = [rows[start:start + micro_batch_size] for start in range(0, len(rows), micro_batch_size)]
    generated = [node for root in trees for node in nodes(root)[1:]]
    kept = [node for node in generated if node.advantage is not None]
    tokens = sum(sum(row["weights"]) for batch in batches for row in batch)  # = counted_tokens(trees)
    divisor = tokens if total_tokens is None else total_tokens
    if not divisor >= tokens:
        raise ValueError(f"total_tokens={total_tokens} is less than these trees' {tokens} counted tokens")
    stats = {"tokens": tokens, "kept_nodes": len(kept), "pruned_nodes": len(generated) - len(kept),
             "mean_abs_advantage": sum(abs(node.advantage) for node in kept) / max(len(kept), 1),
             "positions": sum(len(row["tokens"]) for batch in batches for row in batch), "forwards": len(batches),
             "logit_positions": 0, "kl": 0.0, "clip_fraction": 0.0, "packed": packed}
    total_loss = 0.0
    for rows in batches:
        batch = collate(rows, model.device, packed)
        columns = (batch["weights"] > 0).any(0).nonzero().squeeze(1)  # (K,) columns where some row is trained
        inputs = (batch["input_ids"], batch["attention_mask"], temperature, columns, batch["previous"][columns],
                  batch["positions"])
        logprobs = token_logprobs(model, *inputs, head=heads[0])  # (rows, K)
        with torch.no_grad():
            ref_logprobs = token_logprobs(ref_model, *inputs, head=heads[1]) if kl_coef else None
        old_logprobs = batch["old_logprobs"][:, columns]
        old_logprobs = torch.where(old_logprobs.isnan(), logprobs.detach(), old_logprobs)
        if keep_logprobs:
            keep_node_logprobs(rows, columns, logprobs.detach())
        loss_sum, sums = ppo_clip_loss(logprobs, old_logprobs, batch["advantages"][:, columns],
                                       batch["weights"][:, columns], ref_logprobs, clip_eps, kl_coef)
        stats["logit_positions"] += logprobs.numel()
        (loss_sum / divisor).backward()
        total_loss += loss_sum.item() / divisor
        stats["kl"] += sums["kl"] / divisor
        stats["clip_fraction"] += sums["clipped"] / divisor
    return total_loss, stats


def ppo_clip_loss(logprobs, old_logprobs, advantages, weights, ref_logprobs=None, clip_eps=0.2, kl_coef=0.0):
    """PPO's clipped surrogate with a k3 KL penalty, per token, summed with `weights` (0: not trained).
    All inputs (rows, T). Returns (the weighted sum, {"kl": ..., "clipped": ...} weighted sums).
        r = exp(logp - logp_old)
        loss = -min(r A, clip(r, 1 - eps, 1 + eps) A) + kl_coef * (exp(ref - logp) - (ref - logp) - 1)
    """
    ratio = torch.exp(logprobs - old_logprobs)
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1  # k3: unbiased, always >= 0
        loss = loss + kl_coef * kl
    # Clipped where the clip binds (its gradient is 0), as TRL counts it: r above 1 + eps with A > 0, or
    # below 1 - eps with A < 0. Elsewhere min() takes the unclipped term and the token still trains.
    clipped = (((ratio > 1 + clip_eps) & (advantages > 0)) | ((ratio < 1 - clip_eps) & (advantages < 0))).float()
    return (loss * weights).sum(), {"kl": (kl.detach() * weights).sum().item(),
                                    "clipped": (clipped * weights).sum().item()}


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0, columns=None, predictors=None,
                   positions=None, head=None, chunk_size: int = 1024):
    """Teacher-forced log p(token | the tokens before it) under softmax(logits / temperature): (rows, K).

    input_ids: (rows, T); attention_mask: (rows, T), or a packed row's (1, 1, T, T) "may attend" (bool).
    columns: (K,) the columns scored (default 1 .. T-1); predictors: (K,) the column predicting each
    (default t - 1); positions: (rows, T). head (`plain_output_head`): past chunk_size scored positions
    the head runs a chunk at a time, so that the (rows, K, vocab) logits never exist at once."""
    if columns is None:
        columns = torch.arange(1, input_ids.shape[1], device=input_ids.device)
    predictors = columns - 1 if predictors is None else predictors
    positions = position_ids(attention_mask) if positions is None else positions
    if attention_mask.dim() == 4:  # in the form this model's attention reads: policy and reference may differ
        attention_mask = mask_for(model, attention_mask)
    targets = input_ids[:, columns]  # (rows, K)
    # logits_to_keep: project onto the vocabulary only where a token is scored (12x faster for Qwen's 151k).
    keep, arguments = logits_to_keep(model, predictors), dict(attention_mask=attention_mask, position_ids=positions)
    if len(columns) > chunk_size and head is not None:
        with hidden_states_out(model, head):
            hidden = model(input_ids, **arguments, **keep, **no_router_logits(model)).logits  # (rows, K, H)
        hidden = hidden if hidden.shape[1] == len(columns) else hidden[:, predictors]  # logits_to_keep ignored
        return torch.cat([chunk_logprobs(head, hidden[:, start:start + chunk_size],
                                         targets[:, start:start + chunk_size], temperature)
                          for start in range(0, len(columns), chunk_size)], dim=1)
    logits = model(input_ids, **arguments, **keep, **no_router_logits(model)).logits  # (rows, K or T, V)
    # K < T always (the first token has no predictor): T positions back means logits_to_keep was ignored
    return target_logprobs(logits if logits.shape[1] == len(columns) else logits[:, predictors], targets, temperature)


def target_logprobs(logits, targets, temperature: float):
    """log_softmax(logits / temperature) at the targets: (rows, K, V), (rows, K) -> (rows, K)."""
    logits = logits.float() / temperature
    return (logits.gather(-1, targets[..., None]) - logits.logsumexp(-1, keepdim=True)).squeeze(-1)


def chunk_logprobs(head, hidden, targets, temperature: float):
    """target_logprobs of head(hidden) for one chunk, hidden (rows, C, H). Under autograd the chunk's
    logits are recomputed in the backward pass (a 4,096-position row's fp32 logits: 2.5 GB a copy)."""
    def logprobs(hidden):
        return target_logprobs(head(hidden), targets, temperature)
    if torch.is_grad_enabled() and hidden.requires_grad:
        return torch.utils.checkpoint.checkpoint(logprobs, hidden, use_reentrant=False)
    return logprobs(hidden)


# ----------------------------------------------------------------------------------------------
# 4b. The rows the loss forwards
#
# The trees go to the model as rows of tokens, laid out one of two ways with the same loss and
# gradient. Leaf paths (`leaf_path_rows`): a row per leaf under the usual causal mask; any attention
# works, but a shared prefix is forwarded once per leaf below it. Packed (`packed_rows`, the
# default): a tree per row, each segment once, under a tree mask that shows a token its own path,
# at the positions it would have if its path stood alone. One packed row, worked out: a 3-token
# prompt P, its children a and b, and a's children aa and ab, two tokens each:
#
#     index      0  1  2   3  4   5  6   7  8   9 10       sees     P  a aa ab  b
#     tokens     P  P  P   a  a  aa aa  ab ab   b  b       P        1  .  .  .  .
#     slots      0  0  0   1  1   2  2   3  3   4  4       a        1  1  .  .  .
#     positions  0  1  2   3  4   5  6   5  6   3  4       aa       1  1  1  .  .
#     previous  -1  0  1   2  3   4  5   4  7   2  9       ab       1  1  .  1  .
#                                                          b        1  .  .  .  1
# `previous` is the token whose logits predict this one: ab's first token (7) is predicted by a's
# last (4), b's first (9) by the prompt's last (2). The mask: token i may attend to token j <= i
# when sees[slot i, slot j]; so ab's tokens see 0-4 and 7-8, never aa (5-6).


def leaf_path_rows(root: TreeNode) -> list[dict]:
    """A row per leaf, the prompt and the path (keys as `training_row`); each node counts in the row of
    the first leaf below it, and a row with nothing counted is left out."""
    rows, seen = [], set()
    for leaf in leaves(root):
        path = path_from_root(leaf)
        counted = {node for node in path if node not in seen and node.advantage is not None}
        seen.update(path)
        if counted:
            rows.append(training_row([root] + path, counted))
    return rows


def packed_rows(root: TreeNode, max_tokens: int) -> list[dict]:
    """The tree in rows of at most `max_tokens` tokens (keys as `training_row`), each segment counted in
    exactly one. Nodes with something counted at or below go in depth-first; one that does not fit
    starts a new row, which repeats its prompt and ancestors as uncounted context."""
    groups, members, counted = [], [root], set()
    for node in nodes(root)[1:]:
        if not any(below.advantage is not None for below in nodes(node)):
            continue  # nothing to train here or below: not forwarded
        if len(members) > 1 and sum(len(member.tokens) for member in members) + len(node.tokens) > max_tokens:
            groups.append((members, counted))
            members, counted = [root] + path_from_root(node)[:-1], set()  # the path so far, as context
        members.append(node)
        if node.advantage is not None:
            counted.add(node)
    groups.append((members, counted))
    return [training_row(members, counted) for members, counted in groups if counted]


def training_row(members: list[TreeNode], counted: set) -> dict:
    """One row of `members`' segments (a root first, each node after its parent), trained where in `counted`:
    per token the lists of the worked row above, advantages, weights and old_logprobs; and sees[a, b]."""
    row = {key: [] for key in ("tokens", "advantages", "weights", "old_logprobs", "positions", "previous", "slots")}
    members = members[:max(slot for slot, node in enumerate(members) if node in counted) + 1]
    row["members"], last = members, {}  # last: each member's last token index
    for slot, node in enumerate(members):
        start, length, trained = len(row["tokens"]), len(node.tokens), node in counted
        before = last.get(node.parent)  # None for a prompt
        first_position = row["positions"][before] + 1 if before is not None else 0
        row["tokens"] += node.tokens
        row["advantages"] += [node.advantage if trained else 0.0] * length
        row["weights"] += [node.weight if trained else 0] * length
        row["old_logprobs"] += node.logprobs if node.logprobs is not None else [math.nan] * length
        row["positions"] += range(first_position, first_position + length)
        row["previous"] += [before if before is not None else -1] + list(range(start, start + length - 1))
        row["slots"] += [slot] * length
        last[node] = start + length - 1
    slot_of = {node: slot for slot, node in enumerate(members)}
    row["sees"] = torch.zeros(len(members), len(members), dtype=torch.bool)
    for node in members:  # every ancestor of a member is a member
        for step in [members[0], *path_from_root(node)]:
            row["sees"][slot_of[node], slot_of[step]] = True
    return row


def collate(rows: list[dict], device, packed: bool) -> dict:
    """Rows as tensors: input_ids, attention_mask, positions, advantages, weights, old_logprobs (rows, T),
    previous (T,). Leaf paths are right-padded; a packed row brings its own positions and tree mask."""
    input_ids, attention_mask = pad_rows([row["tokens"] for row in rows], pad_id=0, side="right")
    width = input_ids.shape[1]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": position_ids(attention_mask),
             "previous": torch.arange(width) - 1}
    if packed:  # token i may attend to j <= i where j's node is i's or an ancestor
        (row,) = rows
        slots = torch.tensor(row["slots"])
        batch |= {"attention_mask": row["sees"][slots][:, slots].tril()[None, None],
                  "positions": torch.tensor([row["positions"]]), "previous": torch.tensor(row["previous"])}
    for key, fill in (("advantages", 0.0), ("weights", 0), ("old_logprobs", math.nan)):
        batch[key] = torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in rows], dtype=torch.float)
    return {key: tensor.to(device) for key, tensor in batch.items()}


def keep_node_logprobs(rows: list[dict], columns, logprobs) -> None:
    """Set `logprobs` of each node trained in `rows` from logprobs (rows, K) at `columns` (K,)."""
    index_of = {column: k for k, column in enumerate(columns.tolist())}
    for row_logprobs, row in zip(logprobs.tolist(), rows):
        trained = {}  # slot -> the log-probs of its trained tokens, in order
        for index, (slot, weight) in enumerate(zip(row["slots"], row["weights"])):
            if weight > 0:
                trained.setdefault(slot, []).append(row_logprobs[index_of[index]])
        for slot, node_logprobs in trained.items():
            row["members"][slot].logprobs = node_logprobs


def counted_tokens(trees: list[TreeNode]) -> float:
    """The weight the loss averages over: every kept node's tokens, times its weight, each node once."""
    return sum(node.weight * len(node.tokens) for root in trees for node in nodes(root)[1:]
               if node.advantage is not None)


# ----------------------------------------------------------------------------------------------
# Checks and model switches. A check refuses bad input in one line before the work it guards.
# Whether a model branches, packs rows and chunks its head is measured on a few of its own tokens.


# generation_config settings that would change the distribution `generate` samples from (the
# recorded log-probs would not be the sampled ones) or the rows it returns. The common ones are
# overridden (`generate_settings`); any of these, set away from its neutral value or None, is refused.
REFUSED_GENERATION = dict(
    min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, top_h=None, no_repeat_ngram_size=0, min_length=0,
    encoder_no_repeat_ngram_size=0, encoder_repetition_penalty=1.0, bad_words_ids=None, force_words_ids=None,
    suppress_tokens=None, begin_suppress_tokens=None, sequence_bias=None, forced_bos_token_id=None, num_beams=1,
    forced_eos_token_id=None, forced_decoder_ids=None, exponential_decay_length_penalty=None, renormalize_logits=False,
    min_new_tokens=0, num_beam_groups=1, diversity_penalty=0.0, num_return_sequences=1, penalty_alpha=None,
    dola_layers=None, guidance_scale=1.0, watermarking_config=None, stop_strings=None, max_time=None,
    prompt_lookup_num_tokens=None)


def generate_settings(model, pad_id, eos_ids, temperature, top_p, do_sample) -> dict:
    """`generate`'s keywords: tokens from softmax(logits / temperature) (top_p if < 1), or greedy."""
    for name, neutral in REFUSED_GENERATION.items():
        value = getattr(model.generation_config, name, None)
        if value is not None and value != neutral:
            raise ValueError(f"model.generation_config.{name} = {value!r} would change what is sampled or recorded; "
                             f"set it to {neutral!r} to sample trees")
    generation = dict(pad_token_id=pad_id, eos_token_id=sorted(eos_ids), do_sample=do_sample,
                      repetition_penalty=1.0,  # 1.0 overrides a model's default
                      cache_implementation=None,  # the tree brings its own cache (Gemma's configs name "hybrid")
                      **no_router_logits(model))
    if do_sample:  # top_k=0 too: the distribution sampled is the one recorded
        generation.update(temperature=temperature, top_p=top_p, top_k=0)
    return generation


class SampledLogprobs(LogitsProcessor):
    """Records log p(drawn token) under softmax(logits / temperature) while `generate` runs, one (rows,
    vocab) step at a time (`output_logits=True` would keep every step's: GBs for a 151k vocabulary)."""

    def __init__(self, temperature: float):
        self.temperature, self.pending, self.steps = temperature, None, []  # steps: a (rows,) tensor a step

    def __call__(self, input_ids, scores):  # (rows, T), (rows, V): logits before their token is drawn
        self.take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores  # unchanged: this processor only watches

    def take(self, drawn_tokens):
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, drawn_tokens[:, None]).squeeze(1))

    def result(self, sequences):  # (rows, W): log-probs of the W drawn tokens; sequences: generate's output
        self.take(sequences[:, -1])
        return torch.stack(self.steps, dim=1)


@torch.no_grad()
def check_branchable(model, token_ids: list[int], generation: dict, eos_ids: set[int]):
    """Refuse in one line a model that a copied KV cache does not branch (a recurrent state, a cache
    that reports a wrong length, positions that ignore the padding, ...). Measured by the sampler itself:
    a greedy tree of two levels of 2 tokens over two prompts (4 tokens, and 2 left-padded), whose
    recorded log-probs must be teacher forcing's over each path, unpadded."""
    prompts = [(list(token_ids) * 4)[:4], (list(token_ids) * 4)[:2]]
    roots = [TreeNode(tokens=prompt) for prompt in prompts]
    greedy = {key: value for key, value in generation.items() if key not in ("temperature", "top_p", "top_k",
                                                                               "max_new_tokens")}
    try:
        with torch.autocast(model.device.type, enabled=False):  # in the weights' own precision
            input_ids, mask = pad_rows(prompts, generation["pad_token_id"], side="left", device=model.device)
            grow_trees(model, roots, input_ids, mask, branches=[2, 1], segments=[2, 2], eos_ids=eos_ids,
                       logprob_temperature=1.0, **greedy | {"do_sample": False})
            gap = 0.0
            for root in roots:
                for node in nodes(root)[1:]:
                    ids = torch.tensor([root.tokens + response_tokens(node)], device=model.device)
                    forced = token_logprobs(model, ids, torch.ones_like(ids))[0, -len(node.tokens):]
                    gap = max(gap, (forced - torch.tensor(node.logprobs, device=ids.device)).abs().max().item())
    except Exception as error:  # whatever the model raises, it cannot be branched: say so in one line
        raise ValueError(f"{type(model).__name__} cannot be sampled as a tree: continuing a copied KV cache raised "
                         f"{error_line(error)}") from None
    if not gap <= tolerance(model):
        raise ValueError(f"{type(model).__name__} cannot be sampled as a tree: the log-probs of tokens drawn on a "
                         f"copied KV cache are off by {gap:.2g} from a fresh forward's over the same tokens")


def can_pack(models: list, trees: list[TreeNode], packed: bool | None, device) -> bool:
    """Whether the loss packs rows: where, for each model, one packed row of the batch's longest path and
    a 2-token branch beside it gives the two leaf paths' log-probs. A tree mask replaces a model's own,
    so a sliding window shorter than a path, or a position bias read from a 2D mask, fails this.
    packed=True: a ValueError if it fails."""
    paths = [(root, leaf) for root in trees for leaf in leaves(root) if leaf is not root]
    if packed is False or not paths:
        return packed is not False
    root, leaf = max(paths, key=lambda path: len(path[0].tokens) + len(response_tokens(path[1])))
    probe, tokens = TreeNode(tokens=root.tokens), response_tokens(leaf)
    probe.children = [TreeNode(tokens=part, parent=probe, depth=1, advantage=1.0) for part in (tokens, tokens[:2])]
    for model in models:
        try:
            with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
                packed_row, leaf_paths = [trained_logprobs(model, collate(rows, device, layout)) for layout, rows in (
                    (True, packed_rows(probe, 2 * len(root.tokens + tokens))), (False, leaf_path_rows(probe)))]
            gap = (packed_row - leaf_paths).abs().max().item()
            why = f"log-probs off by {gap:.2g} from its leaf paths'"
        except Exception as error:  # e.g. a position bias built from a 2D mask
            gap, why = math.inf, error_line(error)
        if not gap <= tolerance(model):
            if packed:
                raise ValueError(f"packed=True: a packed row of {type(model).__name__} gave {why}; "
                                 "packed=False trains leaf paths, with the same result")
            return False
    return True


def trained_logprobs(model, batch: dict):
    """The log-probs of the tokens a collated batch trains, in order: (trained tokens,)."""
    columns = (batch["weights"] > 0).any(0).nonzero().squeeze(1)
    logprobs = token_logprobs(model, batch["input_ids"], batch["attention_mask"], 1.0, columns,
                              batch["previous"][columns], batch["positions"])
    return logprobs[batch["weights"][:, columns] > 0].float()


@torch.no_grad()
def plain_output_head(model, trees: list[TreeNode], device):
    """The output projection where the model's logits are exactly head(last hidden state), measured on a
    few prompt tokens (a scaled or soft-capped head's are not), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or not trees:
        return None
    ids = torch.tensor([trees[0].tokens[:8]], device=device)
    try:
        with torch.autocast(torch.device(device).type, enabled=False):
            logits = model(ids, **no_router_logits(model)).logits
            with hidden_states_out(model, head):
                projected = head(model(ids, **no_router_logits(model)).logits)
    except Exception:  # a forward that reads its head's own attributes: no chunks
        return None
    return head if projected.shape == logits.shape and torch.allclose(projected, logits, rtol=1e-4, atol=1e-5) else None


def error_line(error: BaseException) -> str:
    """An exception in one line: its type, and its message's first line if it has one (a bare assert's has none)."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def tolerance(model) -> float:
    """How far two computations of the same numbers may differ: 1e-3 in fp32 weights, else 5e-2."""
    weights = next(iter(getattr(model, "parameters", list)()), None)
    return 1e-3 if weights is None or weights.dtype == torch.float32 else 5e-2


def check_sampling_args(prompts, temperature, top_p, do_sample, branch, depth, segment_tokens, max_rows):
    """The branches and the segment lengths, one a level; a ValueError for a bad argument or too many rows."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    check_count("depth", depth)
    levels = []
    for name, value in (("branch", branch), ("segment_tokens", segment_tokens)):
        levels.append(list(value) if isinstance(value, (list, tuple)) else [value] * depth)
        if len(levels[-1]) != depth:
            raise ValueError(f"{name} has {len(levels[-1])} values for depth {depth}: give one a level, or one number")
        for number in levels[-1]:
            check_count(name, number)
    check_rows(len(prompts) * math.prod(levels[0]), max_rows, f"{len(prompts)} prompts x branches {levels[0]}")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):  # greedy reads neither temperature nor top_p
        raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature!r} and {top_p!r}")
    return levels


def check_rows(rows: int, max_rows: int, what: str):
    check_count("max_rows", max_rows)
    if rows > max_rows:
        raise ValueError(f"{what} = {rows:,} rows in the last level, over max_rows={max_rows:,} (each row holds a "
                         "KV cache): sample fewer prompts per call or a smaller tree, or raise max_rows")


def check_count(name, number):
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:  # True is an int in Python
        raise ValueError(f"{name} must be an integer >= 1, got {number!r}")


def special_ids(model, tokenizer) -> tuple[int, set[int]]:
    """(pad id, EOS ids): the tokenizer's EOS and the model's generation_config's (Qwen has two). Without
    a pad token an EOS pads: segments end at their first EOS, so no pad is ever read as a token."""
    eos_ids = set()
    for eos in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        eos_ids.update([] if eos is None else [eos] if isinstance(eos, int) else eos)
    if tokenizer.pad_token_id is None and not eos_ids:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; "
                         "set one, e.g. tokenizer.pad_token = tokenizer.eos_token")
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos_ids, default=None)
    return (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback), eos_ids


def check_lengths(model, prompt_ids, response_tokens_max):
    if not all(prompt_ids):
        raise ValueError(f"prompt {[bool(ids) for ids in prompt_ids].index(False)} encodes to no tokens: "
                         "every prompt needs at least one")
    context, longest = getattr(model.config, "max_position_embeddings", None), max(map(len, prompt_ids))
    if context is not None and longest + response_tokens_max > context:
        raise ValueError(f"the longest prompt ({longest} tokens) + depth * segment_tokens "
                         f"({response_tokens_max}) exceeds the model's context of {context} tokens")


def reward_of(leaf: TreeNode) -> float:
    """A leaf's reward as a float: a finite bool, int, float or numpy number, else a ValueError."""
    if leaf.reward is None:
        raise ValueError(f"a leaf at depth {leaf.depth} has no reward: set leaf.reward on every leaf first")
    if not isinstance(leaf.reward, numbers.Real) or not math.isfinite(leaf.reward):
        raise ValueError(f"a leaf at depth {leaf.depth} has reward {leaf.reward!r}: rewards must be finite numbers")
    return float(leaf.reward)


def check_loss_args(trees, ref_model, kl_coef, temperature, micro_batch_size, max_row_tokens):
    if not isinstance(trees, (list, tuple)) or not all(isinstance(root, TreeNode) for root in trees):
        raise ValueError(f"trees must be a list of TreeNode roots, got {type(trees).__name__}")
    for i, root in enumerate(trees):
        if root.value is None:  # else its loss would be 0 with 0 tokens, indistinguishable from "all pruned"
            raise ValueError(f"tree {i} has no values or advantages: call assign_advantages(root) first")
        bad = [node for node in nodes(root)[1:] if node.advantage is not None and not math.isfinite(node.advantage)]
        if bad:
            raise ValueError(f"a depth-{bad[0].depth} node of tree {i} has advantage {bad[0].advantage}: "
                             "advantages must be finite (or None: not trained)")
    if kl_coef and ref_model is None:
        raise ValueError("kl_coef > 0 needs ref_model, the frozen starting model")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (the one sampled with), got {temperature!r}")
    check_count("micro_batch_size", micro_batch_size)
    check_count("max_row_tokens", max_row_tokens)


def pad_rows(rows: list[list[int]], pad_id: int, side: str, device=None):
    """Token lists padded to one width, on the left or right: input_ids (rows, T), attention_mask (rows, T)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, columns], attention_mask[i, columns] = torch.tensor(row, dtype=torch.long), 1
    return input_ids.to(device), attention_mask.to(device)


def position_ids(attention_mask):
    """Positions that skip padding, so a left-padded row is encoded as if unpadded.  (rows, T)"""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def mask_for(model, sees: torch.Tensor) -> torch.Tensor:
    """A (1, 1, T, T) "may attend" as `model`'s attention adds it: bool (sdpa), 0 / -inf (eager)."""
    if model.config._attn_implementation == "sdpa":
        return sees
    return torch.zeros(sees.shape, device=sees.device).masked_fill(~sees, torch.finfo(torch.float32).min)


def forward_takes(model, name: str) -> bool:
    parameters = inspect.signature(getattr(model, "forward", model)).parameters
    return name in parameters


def cache_argument(model, cache) -> dict:
    """How `forward` and `generate` take a KV cache: `cache` from transformers 5.24, else `past_key_values`."""
    return {"cache" if forward_takes(model, "cache") else "past_key_values": cache}


def logits_to_keep(model, columns) -> dict:
    """`logits_to_keep=columns` where the forward may take it (by name or **kwargs); a model that ignores
    it computes every position's logits (the same values, more memory), and `token_logprobs` sees it."""
    parameters = inspect.signature(getattr(model, "forward", model)).parameters.values()
    return {"logits_to_keep": columns} if forward_takes(model, "logits_to_keep") or \
        any(p.kind is p.VAR_KEYWORD for p in parameters) else {}


def no_router_logits(model) -> dict:
    """`output_router_logits=False` where the forward takes it (mixtures of experts): their balancing
    loss reads a 2D mask, and fails on a tree mask and on a cached step; nothing here needs it."""
    return {"output_router_logits": False} if forward_takes(model, "output_router_logits") else {}


@contextlib.contextmanager
def hidden_states_out(model, head):
    """While inside, `model`'s forward returns its last hidden states in place of logits."""
    try:
        model.set_output_embeddings(torch.nn.Identity())
        yield
    finally:
        model.set_output_embeddings(head)
