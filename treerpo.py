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

With depth=1 the tree is N independent answers to the prompt and TreeRPO is exactly GRPO.
The four sections below follow these steps; the guards and compatibility helpers come last.
Models: any Hugging Face causal LM whose generation state is a KV cache (`DynamicCache`); state-space,
hybrid and encoder-decoder models are refused. Packed rows need an attention that takes a 4D mask
(sdpa, eager) and no sliding window shorter than a path (Mistral, Gemma): elsewhere the loss trains
leaf paths, with the same result. A forward without `logits_to_keep` works too, computing every
position's logits (more memory). The families tested are in the README ("Which models").
"""

import contextlib
import inspect
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

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
                 segment_tokens: int | list[int],
                 temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                 return_logprobs: bool = False, max_rows: int = 4096, should_stop=None) -> list[TreeNode]:
    """Sample one tree per prompt; returns the roots.

    prompts: already-templated text, tokenized without special tokens (a chat template writes its
        own BOS). Every node below the root has `branch` children until `depth`, or until its segment
        ends in EOS. Segments are at most `segment_tokens` long; only EOS ends one early.
    branch, segment_tokens: one number for every level, or a list of one a level (depth of them):
        branch=[8, 2] samples eight openings and two continuations of each.
    return_logprobs: record, per segment token, log p under softmax(logits / temperature), the
        distribution sampled from when top_p = 1. `backward_loss` uses the same definition.
    max_rows: refuse, before anything is allocated, a last level that could need more rows (prompts
        x branch ** depth), each with its KV cache. Runs under no_grad in eval mode (mode restored).
    should_stop: a function of nothing, checked at every generated token: when it returns True,
        sampling ends there and StopRequested is raised (a training loop's Ctrl-C).
    """
    check_sampling_args(prompts, temperature, top_p, do_sample, depth=depth)
    branches, segments = per_level("branch", branch, depth), per_level("segment_tokens", segment_tokens, depth)
    check_branchable(model)
    check_rows(len(prompts) * math.prod(branches), max_rows, f"{len(prompts)} prompts x branch {branch} ** depth {depth}"
               if isinstance(branch, int) else f"{len(prompts)} prompts x branches {branches}")
    pad_id, eos_ids = special_ids(model, tokenizer)
    prompt_ids = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    check_lengths(model, prompt_ids, sum(segments))

    roots = [TreeNode(tokens=ids) for ids in prompt_ids]
    input_ids, attention_mask = pad_rows(prompt_ids, pad_id, side="left", device=model.device)  # (B, P)
    generation = generate_settings(model, pad_id, eos_ids, segments[0], temperature, top_p, do_sample, should_stop)
    was_training = model.training
    model.eval()  # sampling is inference: no dropout, and gradient checkpointing would turn the cache off
    try:
        grow_trees(model, roots, input_ids, attention_mask, branches=branches, segments=segments, eos_ids=eos_ids,
                   logprob_temperature=temperature if return_logprobs else None, should_stop=should_stop,
                   **generation)
    finally:
        model.train(was_training)
    return roots


def generate_settings(model, pad_id, eos_ids, segment_tokens, temperature, top_p, do_sample,
                      should_stop=None) -> dict:
    """`generate`'s keyword arguments: L tokens from softmax(logits / temperature) (top_p if < 1),
    ended at the next token when should_stop() is true."""
    for name, neutral in REFUSED_GENERATION.items():
        value = getattr(model.generation_config, name, None)
        if value is not None and value != neutral:
            raise ValueError(f"model.generation_config.{name} = {value!r} would change what is sampled or recorded; "
                             f"set it to {neutral!r} to sample trees")
    generation = dict(max_new_tokens=segment_tokens, pad_token_id=pad_id, eos_token_id=sorted(eos_ids),
                      do_sample=do_sample, repetition_penalty=1.0,  # 1.0 overrides a model's default
                      cache_implementation=None,  # the tree brings its own cache (Gemma's configs name "hybrid")
                      **no_router_logits(model))
    if do_sample:  # top_k=0 too: the distribution sampled is the one recorded
        generation.update(temperature=temperature, top_p=top_p, top_k=0)
    if should_stop is not None:
        generation["stopping_criteria"] = StoppingCriteriaList([StopWhen(should_stop)])
    return generation


@torch.no_grad()
def grow_trees(model, roots, input_ids, attention_mask, *, branches, segments, eos_ids, logprob_temperature,
               should_stop=None, **generation):
    """Add a level of children under `roots` for each of `branches` (children a node) and `segments`
    (tokens a segment), in place. input_ids, attention_mask: (B, P), the left-padded prompts.
    generation: `generate`'s keyword arguments. logprob_temperature: record log-probs at this
    temperature, or None. should_stop: see sample_trees."""
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
                             return_dict_in_generate=True, **(generation | {"max_new_tokens": segment_tokens}))
        stop_point(should_stop)  # before the rows it cut short become nodes
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
    """Prefill a cache with every prompt token but the last.  input_ids, attention_mask: (B, P).
    `generate` encodes only what the cache has not seen, so each level feeds just the newest token;
    the last prompt token is left to `generate`, which needs its logits to draw the first new one."""
    cache = DynamicCache(config=model.config)
    if input_ids.shape[1] > 1:
        # logits_to_keep=1: skip the (B, P, vocab) logits nobody reads (GBs for a 151k vocabulary).
        model(input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=position_ids(attention_mask[:, :-1]),
              **cache_argument(model, cache), use_cache=True, **logits_to_keep(model, 1), **no_router_logits(model))
    return cache


class StopRequested(Exception):
    """Raised at a safe point once `should_stop()` says so: between generated tokens (the unfinished
    trees are dropped) or between the loss's forwards (its gradients so far are partial: zero them)."""


class StopWhen(StoppingCriteria):
    """Ends `generate` at the next token, every row at once, when should_stop() is true."""

    def __init__(self, should_stop):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):  # (rows, T) -> (rows,) bool: done
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool, device=input_ids.device)


def stop_point(should_stop):
    if should_stop is not None and should_stop():
        raise StopRequested


class SampledLogprobs(LogitsProcessor):
    """Records log p(drawn token) under softmax(logits / temperature) while `generate` runs. It sees
    a step's logits before the token is drawn and the token at the next call, so it holds one
    (rows, vocab) step at a time, where `output_logits=True` keeps all (GBs for a 151k vocabulary)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending = None  # (rows, V) log-probs of the step whose token is not drawn yet
        self.steps = []  # one (rows,) tensor per step: log p of the drawn token

    def __call__(self, input_ids, scores):  # input_ids: (rows, T), scores: (rows, V)
        self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores  # unchanged: this processor only watches

    def _take(self, drawn_tokens):
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, drawn_tokens[:, None]).squeeze(1))

    def result(self, sequences):
        """(rows, W) log-probs of the W drawn tokens; `sequences` is generate's output."""
        self._take(sequences[:, -1])
        return torch.stack(self.steps, dim=1)


def add_children(parents, new_tokens, logprobs, eos_ids, segment_tokens) -> list[TreeNode]:
    """Attach row r of `new_tokens` (rows, W) as a child of parents[r]; returns the children. A
    segment runs up to and including its first EOS (trained on: it is the model's decision to
    stop); what follows is generate's padding and is dropped."""
    children = []
    for row, parent in enumerate(parents):
        tokens = new_tokens[row].tolist()
        eos_at = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
        finished = eos_at is not None
        length = eos_at + 1 if finished else len(tokens)
        if not finished and length < segment_tokens:  # pads would become tokens: refuse, loudly
            raise RuntimeError("generate stopped a row before EOS and before segment_tokens; "
                               "check the model's generation_config (stop_strings, max_length)")
        child = TreeNode(tokens=tokens[:length], parent=parent, depth=parent.depth + 1, finished=finished,
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
        "grpo":   A(v) = (V(v) - V(root)) / std(the tree's leaf rewards) + the sibling A above (or 0 if tied)
                  (Tree-GRPO's GRPO over the question's answers plus one within each group)
        Both set weight = n: the sources train every leaf's path, a shared segment once per leaf below it.
        A node whose A is 0 is not trained (None).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if root_term not in ROOT_TERMS:
        raise ValueError(f"root_term must be one of {ROOT_TERMS}, got {root_term!r}")
    _assign_values(root)
    root.advantage = None  # the root has no siblings
    for group in [node.children for node in nodes(root) if node.children]:
        values = [child.value for child in group]
        if max(values) - min(values) < tau:
            advantages = [None] * len(group)
        else:
            advantages = group_advantages(values, norm=norm, eps=eps)
            if not all(map(math.isfinite, advantages)):  # e.g. rewards near 1e308 overflow the mean
                raise ValueError(f"the children of a depth-{group[0].depth - 1} node have values {values} and "
                                 "non-finite advantages: rewards this large overflow; scale them down")
        for child, advantage in zip(group, advantages):
            child.advantage = advantage
    if root_term is not None:
        add_root_term(root, root_term, eps)


def add_root_term(root: TreeNode, form: str, eps: float = 1e-6) -> None:
    """The root term of `assign_advantages` (its docstring), on a tree with values and sibling advantages."""
    scale = mean_and_std([reward_of(leaf) for leaf in leaves(root)])[1] + eps if form == "grpo" else 1.0
    for node in nodes(root)[1:]:
        below = len(leaves(node))
        if form == "treerl":
            advantage = (node.value - root.value + node.value - node.parent.value) / math.sqrt(below)
        else:
            advantage = (node.value - root.value) / scale + (node.advantage or 0.0)
        node.advantage, node.weight = (advantage if abs(advantage) > 1e-9 else None), below


def _assign_values(node: TreeNode) -> float:
    if not node.children:
        node.value = reward_of(node)
    else:
        child_values = [_assign_values(child) for child in node.children]
        node.value = sum(child_values) / len(child_values)
    return node.value


def group_advantages(values: list[float], norm: str = "std", eps: float = 1e-6) -> list[float]:
    """GRPO's advantages for one group of sibling values.

    std:       A = (V - mean) / (std + eps), std with Bessel's correction (as torch.std, TRL's GRPO)
    bernoulli: A = (V - mu) / (mu (1 - mu) + eps), mu = mean: divided by the Bernoulli *variance*,
               not its std, so for 0/1 values A is 1 / sqrt(mu (1 - mu)) times the population-std
               norm's (2x at mu = 1/2, 3x at mu = 1/8). A choice, kept for comparison: no source
               that could be read here uses it.
    none:      A = V - mean

    A pair of different values always gets +-1/sqrt(2) = +-0.71 under std, however close they
    are: the mean is halfway, and the std of two values is their gap / sqrt(2). Only N >= 3 (or
    norm="none") makes the size of a gap count; tau decides which pairs count at all.

    >>> [round(a, 3) for a in group_advantages([1.0, 0.0, 0.0, 1.0])]
    [0.866, -0.866, -0.866, 0.866]
    >>> [round(a, 3) for a in group_advantages([1.0, 0.0, 0.0, 0.0], norm="bernoulli")]
    [4.0, -1.333, -1.333, -1.333]
    """
    mean, std = mean_and_std(values)
    centred = [value - mean for value in values]
    if norm == "std":
        return [c / (std + eps) for c in centred]
    if norm == "bernoulli":
        return [c / (mean * (1 - mean) + eps) for c in centred]
    if norm == "none":
        return centred
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def scale_by_step(roots: list[TreeNode], eps: float = 1e-6) -> None:
    """The "step" norm: run assign_advantages(root, norm="none") on every tree of a step, then this,
    which divides every kept advantage V - mean(siblings) by their root mean square over the step.

    Under std a group's advantages ignore the size of its gap: first-level values (0.25, 0, 0, 0),
    one right leaf in 16, give their opening the same +1.5 as (1, 0, 0, 0), four right of four.
    Without a norm the gap counts, but the advantages' scale, and so the step the learning rate
    takes, shrinks with the gaps. One divisor for the whole step keeps the gaps in proportion and
    the scale at 1, as under std: GRPO's group mean with a batch's std, the pairing LitePPO uses
    (arXiv 2508.08221). Tested against std in docs/signal.md.
    """
    kept = [node for root in roots for node in nodes(root)[1:] if node.advantage is not None]
    if kept:
        scale = math.sqrt(sum(node.advantage ** 2 for node in kept) / len(kept))
        for node in kept:
            node.advantage /= scale + eps


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation with Bessel's correction (as torch.std); std 0 for one value."""
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(variance)


# ----------------------------------------------------------------------------------------------
# 4. The loss: PPO-clip on every kept node's tokens, each node counted once
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
    """A row per leaf: the prompt and the path (keys as `training_row`). Each node counts in the
    row of the first leaf below it; a row with nothing counted is left out."""
    rows, seen = [], set()
    for leaf in leaves(root):
        path = path_from_root(leaf)
        counted = {node for node in path if node not in seen and node.advantage is not None}
        seen.update(path)
        if counted:
            rows.append(training_row([root] + path, counted))
    return rows


def packed_rows(root: TreeNode, max_tokens: int) -> list[dict]:
    """The tree in rows of at most `max_tokens` tokens (keys as `training_row`), each segment
    counted in exactly one. The nodes with something counted at or below go in depth-first; one
    that does not fit starts a new row that repeats its prompt and ancestors as uncounted context
    (a row holds at least one node). Trees never share a row: attention costs the square of a
    row's length, and another tree's tokens would only be masked out."""
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
    """One row for the loss: the segments of `members` (a root first, each node after its parent)
    one after another up to the last node in `counted` (later tokens cannot change earlier
    log-probs), trained where the node is in `counted`. Per token: tokens; advantages and
    weights (the node's; 0 where not trained); old_logprobs (NaN where not recorded); positions (on
    its own path); previous (the index of the token before it on its path, whose logits predict
    it; -1 for a prompt's first). And the members, and the tree mask in two parts that `tree_mask`
    expands: slots (each token's member) and sees (members x members: a sees b, b a or its ancestor)."""
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


def tree_mask(row: dict) -> torch.Tensor:
    """(T, T) boolean: token i may attend to token j (j <= i, and j's node is i's or an ancestor)."""
    slots = torch.tensor(row["slots"])
    return row["sees"][slots][:, slots].tril()


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0, columns=None, predictors=None,
                   positions=None, chunk_size: int = 1024):
    """Teacher-forced log p(token | the tokens before it) under softmax(logits / temperature).

    input_ids: (rows, T); attention_mask: (rows, T), or a packed row's (1, 1, T, T) "may attend" (bool).
    columns: the columns t to score, (K,); by default 1 .. T-1. predictors: (K,) the column whose
    logits predict each, by default t - 1 (in a packed row a segment's first token follows its
    parent's last). positions: (rows, T) position ids, by default from the mask. Returns (rows, K).
    chunk_size: past this many scored positions, the output projection runs in chunks of them
    (where the logits are plain head(hidden)), so that the (rows, K, vocab) logits never exist at once.
    Under autocast the head runs as the model's forward runs it (bf16), as when sampling.
    """
    if columns is None:
        columns = torch.arange(1, input_ids.shape[1], device=input_ids.device)
    predictors = columns - 1 if predictors is None else predictors
    positions = position_ids(attention_mask) if positions is None else positions
    if attention_mask.dim() == 4:  # in the form this model's attention reads: policy and reference may differ
        attention_mask = mask_for(model, attention_mask)
    targets = input_ids[:, columns]  # (rows, K)
    # logits_to_keep: project onto the vocabulary only where a token is scored. The prompt's
    # positions need none; with Qwen's 151k vocabulary this cut the bench's loss step 12x (CPU).
    keep, head = logits_to_keep(model, predictors), plain_output_head(model)
    if keep and len(columns) > chunk_size and head is not None:
        with hidden_states_out(model, head):
            hidden = model(input_ids, attention_mask=attention_mask, position_ids=positions, **keep,
                           **no_router_logits(model)).logits  # (rows, K, H)
        return torch.cat([chunk_logprobs(head, hidden[:, start:start + chunk_size],
                                         targets[:, start:start + chunk_size], temperature)
                          for start in range(0, len(columns), chunk_size)], dim=1)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions, **keep, **no_router_logits(model)).logits
    return target_logprobs(logits if keep else logits[:, predictors], targets, temperature)


def target_logprobs(logits, targets, temperature: float):
    """log_softmax(logits / temperature) at the targets: (rows, K, V), (rows, K) -> (rows, K), without
    materialising a second (rows, K, V) tensor of log-probs."""
    logits = logits.float() / temperature
    return (logits.gather(-1, targets[..., None]) - logits.logsumexp(-1, keepdim=True)).squeeze(-1)


def chunk_logprobs(head, hidden, targets, temperature: float):
    """target_logprobs of head(hidden) for one chunk of positions, hidden: (rows, C, H). Under autograd
    the chunk's logits are recomputed in the backward pass instead of kept (activation
    checkpointing): at Qwen's 151,936 tokens a 4,096-position row's fp32 logits are 2.5 GB a copy."""
    def logprobs(hidden):
        return target_logprobs(head(hidden), targets, temperature)
    if torch.is_grad_enabled() and hidden.requires_grad:
        return torch.utils.checkpoint.checkpoint(logprobs, hidden, use_reentrant=False)
    return logprobs(hidden)


def ppo_clip_loss(logprobs, old_logprobs, advantages, weights, ref_logprobs=None, clip_eps=0.2, kl_coef=0.0):
    """Per-token PPO clipped surrogate with an optional k3 KL penalty, summed with `weights`.

    All inputs (rows, T); weights: 0 where a token is not trained, else its node's weight (1 in
    TreeRPO). Returns (weighted sum of per-token losses, dict of weighted sums for the stats).
        r = exp(logp - logp_old)
        loss = -min(r A, clip(r, 1 - eps, 1 + eps) A) + kl_coef * (exp(ref - logp) - (ref - logp) - 1)
    A token counts as clipped where the clip binds: r > 1 + eps with A > 0, or r < 1 - eps with A < 0.
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
    return (loss * weights).sum(), {"kl": (kl.detach() * weights).sum().item(), "clipped": (clipped * weights).sum().item()}


def backward_loss(model, trees: list[TreeNode], *, ref_model=None, kl_coef: float = 0.0, clip_eps: float = 0.2,
                  temperature: float = 1.0, packed: bool | None = None, max_row_tokens: int = 4096,
                  micro_batch_size: int = 8, total_tokens: float | None = None,
                  keep_logprobs: bool = False, should_stop=None) -> tuple[float, dict]:
    """The TreeRPO loss over scored trees, back-propagated; the caller steps the optimizer.
    Returns (the loss value, a dict of stats).

    The loss is the weighted mean over every counted token of the batch, back-propagated forward
    by forward (each part scaled by its share of the tokens), so memory holds one forward's
    activations. Three things a caller must get right:
    temperature: the one the trees were sampled at: log-probs are taken under softmax(logits / T).
    ref_model: with kl_coef > 0, a frozen copy of the starting model that computes as the policy
        does (same weight dtype, under the same autocast), e.g. copy.deepcopy(model).requires_grad_(False).
    the gradient: clip its norm before the optimizer steps (the demo clips to 1.0): a step's norm
        is easily 10 on a real model.
    Old log-probs (PPO's ratio) are each node's `logprobs`; where none are set the ratio is exactly 1
    (plain policy gradient). keep_logprobs: write this pass's log-probs, detached, into the trained
    nodes' `logprobs`, so that later calls on the same trees (PPO's further updates) take them as old.
    packed: True trains `packed_rows` (rows of at most `max_row_tokens` tokens under a tree mask,
        one a forward), which needs models that take it (`can_pack`); False trains `leaf_path_rows`,
        `micro_batch_size` a forward, any model; None: packed where the models can.
    total_tokens: what the loss is divided by: by default these trees' `counted_tokens`; data-parallel
        training passes the whole batch's, then sums the processes' gradients.
    should_stop: checked before each forward and after the last; when it returns True, StopRequested
        is raised (the gradients accumulated so far are partial).
    """
    check_loss_args(trees, ref_model, kl_coef, temperature, micro_batch_size, max_row_tokens)
    packed = can_pack([model] + ([ref_model] if kl_coef else []), trees, packed)
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
        stop_point(should_stop)
        batch = collate(rows, model, packed)
        columns = (batch["weights"] > 0).any(0).nonzero().squeeze(1)  # (K,) columns where some row is trained
        inputs = (batch["input_ids"], batch["attention_mask"], temperature, columns, batch["previous"][columns],
                  batch["positions"])
        logprobs = token_logprobs(model, *inputs)  # (rows, K)
        with torch.no_grad():
            ref_logprobs = token_logprobs(ref_model, *inputs) if kl_coef else None
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
    stop_point(should_stop)  # the loss is whole, the caller's update not begun
    return total_loss, stats


def keep_node_logprobs(rows: list[dict], columns, logprobs) -> None:
    """Set `logprobs` of every node trained in `rows` to its tokens' log-probs: logprobs (rows, K) at
    `columns` (K,). Each trained node is trained in one row only, so each is set once."""
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
    return sum(node.weight * len(node.tokens) for root in trees for node in nodes(root)[1:] if node.advantage is not None)


def collate(rows: list[dict], model, packed: bool) -> dict:
    """Rows of `training_row` as tensors on the model's device: input_ids, attention_mask, positions,
    advantages, weights, old_logprobs (rows, T), and previous (T,), the column predicting each. Leaf
    paths are right-padded (padding is never trained) and share previous = t - 1; a packed row (one
    a batch) brings its own positions, predecessors and tree mask (1, 1, T, T), bool."""
    input_ids, attention_mask = pad_rows([row["tokens"] for row in rows], pad_id=0, side="right")
    width = input_ids.shape[1]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": position_ids(attention_mask),
             "previous": torch.arange(width) - 1}
    if packed:
        (row,) = rows
        batch |= {"attention_mask": tree_mask(row)[None, None], "positions": torch.tensor([row["positions"]]),
                  "previous": torch.tensor(row["previous"])}
    for key, fill in (("advantages", 0.0), ("weights", 0), ("old_logprobs", math.nan)):
        batch[key] = torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in rows], dtype=torch.float)
    return {key: tensor.to(model.device) for key, tensor in batch.items()}


# ----------------------------------------------------------------------------------------------
# Guards (each refuses bad input in one line before any compute) and compatibility helpers


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


ATTENTION_LAYERS = {"full_attention", "sliding_attention"}  # layer_types whose KV cache a copy branches


def check_branchable(model):
    """Refuse, in one line, a model whose generation state is not a KV cache that copying branches:
    encoder-decoders, and state-space or hybrid models (Mamba, Jamba, Bamba, Falcon-H1, LFM2, Qwen3-Next),
    whose recurrent state the tree's cache copies would not carry (one check per transformers version:
    `layer_types` from 5.x, `_is_stateful` in 4.57)."""
    config, name = getattr(model, "config", None), type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model: sample_trees needs a decoder-only causal LM")
    others = sorted(set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYERS)
    supports_dynamic_cache = getattr(model, "_supports_default_dynamic_cache", lambda: True)
    if others or getattr(model, "_is_stateful", False) or not supports_dynamic_cache():
        state = f"layers of type {', '.join(others)}" if others else "a recurrent (state-space) state"
        raise ValueError(f"{name} keeps {state}, which copying a KV cache cannot branch: sample_trees needs an "
                         "attention-only causal LM")


def check_rows(rows: int, max_rows: int, what: str):  # before anything is allocated
    check_count("max_rows", max_rows)
    if rows > max_rows:
        raise ValueError(f"{what} = {rows:,} rows in the last level, over max_rows={max_rows:,} (each row holds a "
                         "KV cache): sample fewer prompts per call or a smaller tree, or raise max_rows")


def check_sampling_args(prompts, temperature, top_p, do_sample, **counts):
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    for name, number in counts.items():
        check_count(name, number)
    if do_sample and not temperature > 0:  # greedy decoding reads neither temperature nor top_p
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if do_sample and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def per_level(name: str, value, depth: int) -> list[int]:
    """`value` for each of `depth` levels: one number for every level, or a list of `depth` numbers."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * depth
    if len(values) != depth:
        raise ValueError(f"{name} has {len(values)} values for depth {depth}: give one a level, or one number")
    for number in values:
        check_count(name, number)
    return values


def check_count(name, number):
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:  # True is an int in Python
        raise ValueError(f"{name} must be an integer >= 1, got {number!r}")


def special_ids(model, tokenizer) -> tuple[int, set[int]]:
    """(pad id, EOS ids). EOS: the tokenizer's and the model's generation_config's (Qwen has two).
    Without a pad token the EOS pads: safe, as segments are cut at their first EOS and finished rows
    never continue, so no pad is ever read as a token."""
    eos_ids = set()
    for eos in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if eos is not None:
            eos_ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer.pad_token_id is None and not eos_ids:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; "
                         "set one, e.g. tokenizer.pad_token = tokenizer.eos_token")
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos_ids, default=None)
    return (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback), eos_ids


def check_lengths(model, prompt_ids, response_tokens_max):
    if not all(prompt_ids):
        raise ValueError(f"prompt {[bool(ids) for ids in prompt_ids].index(False)} encodes to no tokens: "
                         "every prompt needs at least one")
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(ids) for ids in prompt_ids)
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
    """Pad token lists to one width. Returns input_ids (rows, T) and attention_mask (rows, T)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, columns] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, columns] = 1
    return input_ids.to(device), attention_mask.to(device)


def position_ids(attention_mask):
    """Positions that skip padding, so a left-padded row is encoded as if unpadded.  (rows, T)"""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def cache_argument(model, cache) -> dict:
    """How `forward` and `generate` take a KV cache: `cache` from transformers 5.24, else `past_key_values`."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def can_pack(models: list, trees: list[TreeNode], packed: bool | None) -> bool:
    """Whether the loss trains packed rows. Each model must read a custom 4D mask (sdpa, eager) and
    slide no attention window shorter than the longest path: the tree mask replaces the model's
    own, window included (Mistral, Gemma). packed=True: a ValueError if not."""
    longest = max((len(root.tokens) + len(response_tokens(leaf)) for root in trees for leaf in leaves(root)), default=0)
    for model in models:
        attention, window = getattr(getattr(model, "config", None), "_attn_implementation", None), sliding_window(model)
        if attention not in ("sdpa", "eager"):
            problem = (f"attention {attention!r} takes no custom 4D mask (load the model with "
                       "attn_implementation='sdpa' or 'eager')")
        elif window is not None and longest > window:
            problem = f"a path of {longest} tokens is longer than the model's sliding window of {window}"
        else:
            continue
        if packed:
            raise ValueError(f"packed=True: {problem}; packed=False trains leaf paths, with the same result")
        return False
    return packed is not False


def sliding_window(model) -> int | None:
    """The attention window a model slides on some of its layers (Mistral, Gemma 2/3, Qwen2 with
    use_sliding_window), or None."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False or \
            (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


def mask_for(model, sees: torch.Tensor) -> torch.Tensor:
    """A (1, 1, T, T) "may attend" as `model`'s attention adds it: bool (sdpa), 0 / -inf (eager)."""
    if model.config._attn_implementation == "sdpa":
        return sees
    return torch.zeros(sees.shape, device=sees.device).masked_fill(~sees, torch.finfo(torch.float32).min)


def logits_to_keep(model, columns) -> dict:
    """`logits_to_keep=columns` where the forward takes it (by name or **kwargs), else nothing: the
    model then computes every position's logits (the same values, more memory)."""
    parameters = inspect.signature(getattr(model, "forward", model)).parameters
    takes = "logits_to_keep" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return {"logits_to_keep": columns} if takes else {}


def no_router_logits(model) -> dict:
    """`output_router_logits=False` where the forward takes it (mixtures of experts): their router's
    balancing loss reads a 2D mask and fails on a packed row's tree mask, and on a cached generation
    step; neither sampling nor the loss needs it."""
    parameters = inspect.signature(getattr(model, "forward", model)).parameters
    return {"output_router_logits": False} if "output_router_logits" in parameters else {}


def plain_output_head(model):
    """The model's output projection when its logits are exactly head(last hidden state), else None
    (Gemma 2's soft-capping, Cohere's and Granite's scaling, a head that is not a Linear layer)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    scaled = any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return head if isinstance(head, torch.nn.Linear) and not scaled else None


@contextlib.contextmanager
def hidden_states_out(model, head):
    """While inside, `model`'s forward returns its last hidden states in place of logits."""
    model.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        model.set_output_embeddings(head)
