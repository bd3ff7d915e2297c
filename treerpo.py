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
   by its node's A; a segment shared by many leaves counts once.

With depth=1 the tree is N independent answers to the prompt and TreeRPO is exactly GRPO.
Works with any Hugging Face causal LM whose `generate` takes a `DynamicCache`.
"""

import math
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

NORMS = ("std", "bernoulli", "none")


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


def nodes(root: TreeNode) -> list[TreeNode]:
    """Every node under `root`, `root` included, depth-first (parents before children)."""
    return [root] + [node for child in root.children for node in nodes(child)]


def leaves(root: TreeNode) -> list[TreeNode]:
    """The leaves under `root`, left to right."""
    return [node for node in nodes(root) if not node.children]


def path_from_root(node: TreeNode) -> list[TreeNode]:
    """The generated nodes from the root down to `node`: [depth-1 node, ..., node]."""
    path = []
    while node.parent is not None:
        path.append(node)
        node = node.parent
    return path[::-1]


def response_tokens(node: TreeNode) -> list[int]:
    """The tokens generated from the prompt down to `node`: its ancestors' segments, then its own."""
    return [token for step in path_from_root(node) for token in step.tokens]


def format_tree(root: TreeNode, tokenizer, width: int = 40,
                show: tuple[str, ...] = ("reward", "value", "group", "advantage")) -> str:
    """The tree as indented text, one line per node: depth, the segment's text (cut at `width`
    characters, newlines shown as ⏎), EOS for a finished node, then the `show`n fields that are
    set: r = reward (leaves), V = value, group = mean and std of a parent's children's values,
    A = advantage, or `pruned` for the nodes of a dropped group. The root shows the prompt's end.

        prompt (12 tokens) …"What is 2+3?"  V=0.50  group: mean 0.50 std 0.71
        ├─ d1 "2+3 is 5"  V=1.00  A=+0.71
        └─ d1 "I think 6"  V=0.00  A=-0.71
    """
    text = _preview(tokenizer.decode(root.tokens), width, keep_end=True)
    lines = [f"prompt ({len(root.tokens)} tokens) {text}{_fields(root, show)}"]
    return "\n".join(lines + _branch_lines(root, tokenizer, width, show, indent=""))


def _branch_lines(node, tokenizer, width, show, indent) -> list[str]:
    lines = []
    for i, child in enumerate(node.children):
        last = i == len(node.children) - 1
        text = _preview(tokenizer.decode(child.tokens), width)
        lines.append(f"{indent}{'└─' if last else '├─'} d{child.depth} {text}{_fields(child, show)}")
        lines += _branch_lines(child, tokenizer, width, show, indent + ("   " if last else "│  "))
    return lines


def _preview(text: str, width: int, keep_end: bool = False) -> str:
    """Quoted, one line: newlines as ⏎, other control characters escaped, cut to `width`."""
    text = "".join("⏎" if char == "\n" else char if char.isprintable() else repr(char)[1:-1] for char in text)
    if len(text) > width:
        text = "…" + text[-width + 1:] if keep_end else text[:width - 1] + "…"
    return f'"{text}"'


def _fields(node: TreeNode, show) -> str:
    fields = ["EOS"] if node.finished else []
    if "reward" in show and not node.children and node.reward is not None:
        fields.append(f"r={node.reward:g}")
    if "value" in show and node.value is not None:
        fields.append(f"V={node.value:.2f}")
    if "group" in show and len(node.children) > 1 and node.children[0].value is not None:
        mean, std = mean_and_std([child.value for child in node.children])
        fields.append(f"group: mean {mean:.2f} std {std:.2f}")
    if "advantage" in show and node.parent is not None and node.value is not None:
        fields.append("pruned" if node.advantage is None else f"A={node.advantage:+.2f}")
    return "".join("  " + field for field in fields)


# ----------------------------------------------------------------------------------------------
# 1. Sampling: one batched `generate` call per level, branching by copying the KV cache


def sample_trees(model, tokenizer, prompts: list[str], *, branch: int, depth: int, segment_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                 return_logprobs: bool = False) -> list[TreeNode]:
    """Sample one tree per prompt; returns the roots.

    prompts: already-templated text, tokenized without special tokens (a chat template writes its
        own BOS). Every node below the root has `branch` children until `depth`, or until its segment
        ends in EOS. Segments are at most `segment_tokens` long; only EOS ends one early.
    return_logprobs: record, per segment token, log p under softmax(logits / temperature), the
        distribution sampled from when top_p = 1. `backward_loss` uses the same definition.
    Sampling runs under no_grad in eval mode; the model's train/eval mode is restored afterwards.
    """
    _check_sampling_args(prompts, temperature, top_p, do_sample, branch=branch, depth=depth, segment_tokens=segment_tokens)
    pad_id, eos_ids = _special_ids(model, tokenizer)
    prompt_ids = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    _check_lengths(model, prompt_ids, depth * segment_tokens)

    roots = [TreeNode(tokens=ids) for ids in prompt_ids]
    input_ids, attention_mask = pad_rows(prompt_ids, pad_id, side="left", device=model.device)  # (B, P)
    generation = dict(max_new_tokens=segment_tokens, pad_token_id=pad_id, eos_token_id=sorted(eos_ids),
                      do_sample=do_sample, repetition_penalty=1.0)  # 1.0 overrides a model's default
    if do_sample:  # top_k=0 also overrides a default, so the sampled distribution is the one recorded
        generation.update(temperature=temperature, top_p=top_p, top_k=0)
    was_training = model.training
    model.eval()  # sampling is inference: no dropout, and gradient checkpointing would turn the cache off
    try:
        grow_trees(model, roots, input_ids, attention_mask, branch=branch, depth=depth, eos_ids=eos_ids,
                   logprob_temperature=temperature if return_logprobs else None, **generation)
    finally:
        model.train(was_training)
    return roots


@torch.no_grad()
def grow_trees(model, roots, input_ids, attention_mask, *, branch, depth, eos_ids, logprob_temperature,
               **generation):
    """Add `depth` levels of children under `roots`, level by level, in place.

    input_ids, attention_mask: (B, P), the left-padded prompts of `roots`. generation: the keyword
    arguments of `generate`. logprob_temperature: record log-probs at this temperature, or None.
    """
    frontier = roots  # the nodes whose children the next level samples, one row each
    cache = encode_prompts(model, input_ids, attention_mask)
    for level in range(1, depth + 1):
        # Branch: each frontier row becomes `branch` rows with copies of its cache.
        cache.batch_repeat_interleave(branch)  # copies the storage: siblings never alias
        input_ids = input_ids.repeat_interleave(branch, dim=0)  # (rows * N, T)
        attention_mask = attention_mask.repeat_interleave(branch, dim=0)
        parents = [node for node in frontier for _ in range(branch)]

        recorder = SampledLogprobs(logprob_temperature) if logprob_temperature else None
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                             logits_processor=LogitsProcessorList([recorder] if recorder else []),
                             return_dict_in_generate=True, **generation)
        new_tokens = out.sequences[:, input_ids.shape[1]:]  # (rows, W), W < L only if every row hit EOS
        logprobs = recorder.result(out.sequences) if recorder else None  # (rows, W)
        children = add_children(parents, new_tokens, logprobs, eos_ids, generation["max_new_tokens"])

        # Only unfinished rows go on: a finished row's tail is pads that must not be continued.
        keep = [row for row, child in enumerate(children) if not child.finished]
        if level == depth or not keep:
            return
        keep_rows = torch.tensor(keep, device=input_ids.device)
        cache.batch_select_indices(keep_rows)
        input_ids = out.sequences[keep_rows]
        attention_mask = torch.cat([attention_mask, torch.ones_like(new_tokens)], dim=1)[keep_rows]
        frontier = [children[row] for row in keep]


def encode_prompts(model, input_ids, attention_mask) -> DynamicCache:
    """Prefill a cache with every prompt token but the last.  input_ids, attention_mask: (B, P).

    `generate` encodes only the part of `input_ids` that the cache has not seen, so each level
    feeds just the newest token. The last prompt token is left to `generate` because it needs
    that token's logits to draw the first new token.
    """
    cache = DynamicCache(config=model.config)
    if input_ids.shape[1] > 1:
        # logits_to_keep=1: skip the (B, P, vocab) logits nobody reads (GBs for a 151k vocabulary).
        model(input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=position_ids(attention_mask[:, :-1]),
              past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


class SampledLogprobs(LogitsProcessor):
    """Records log p(drawn token) under softmax(logits / temperature) while `generate` runs.

    A logits processor sees a step's logits before the token is drawn and the drawn token at the
    next call, so it holds one (rows, vocab) step at a time, where `output_logits=True` would keep
    every step (GBs for Qwen's 151k vocabulary).
    """

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
    """Attach row r of `new_tokens` (rows, W) as a child of parents[r]; returns the children.

    A segment runs up to and including its first EOS (the EOS is trained on: it is the model's
    decision to stop). Whatever follows the EOS is generate's padding and is dropped here.
    """
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


def _check_sampling_args(prompts, temperature, top_p, do_sample, **counts):
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    for name, number in counts.items():
        _check_count(name, number)
    if do_sample and not temperature > 0:  # greedy decoding reads neither temperature nor top_p
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if do_sample and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _check_count(name, number):
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:  # True is an int in Python
        raise ValueError(f"{name} must be an integer >= 1, got {number!r}")


def _special_ids(model, tokenizer) -> tuple[int, set[int]]:
    """(pad id, EOS ids). EOS: the tokenizer's and the model's generation_config's (Qwen has two).

    Without a pad token the EOS pads: that is safe here because a segment is cut at its first
    EOS and finished rows never continue, so no pad is ever read as a token.
    """
    eos_ids = set()
    for eos in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if eos is not None:
            eos_ids.update([eos] if isinstance(eos, int) else eos)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        if tokenizer.eos_token_id is None and not eos_ids:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; "
                             "set one, e.g. tokenizer.pad_token = tokenizer.eos_token")
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos_ids)
    return pad_id, eos_ids


def _check_lengths(model, prompt_ids, response_tokens_max):
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens: every prompt needs at least one")
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(ids) for ids in prompt_ids)
    if context is not None and longest + response_tokens_max > context:
        raise ValueError(f"the longest prompt ({longest} tokens) + depth * segment_tokens "
                         f"({response_tokens_max}) exceeds the model's context of {context} tokens")


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


# ----------------------------------------------------------------------------------------------
# 2-3. Node values and step-level group advantages


def assign_advantages(root: TreeNode, *, norm: str = "std", tau: float = 0.1, eps: float = 1e-6) -> None:
    """Fill `value` and `advantage` of every node under `root` (SPEC §2-3). Leaf rewards must be set.

    value:     V(leaf) = reward;  V(node) = mean of V(child) over its children (no discount)
    advantage: for each group S of siblings, A(v) = group_advantages(S)[v], or None for every
               node of the group when max S - min S < tau (the group carries no signal).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    _assign_values(root)
    root.advantage = None  # the root has no siblings
    for parent in nodes(root):
        group = parent.children
        if not group:
            continue
        values = [child.value for child in group]
        if max(values) - min(values) < tau:
            advantages = [None] * len(group)
        else:
            advantages = group_advantages(values, norm=norm, eps=eps)
        for child, advantage in zip(group, advantages):
            child.advantage = advantage


def _assign_values(node: TreeNode) -> float:
    if not node.children:
        if node.reward is None:
            raise ValueError(f"a leaf at depth {node.depth} has no reward: set leaf.reward on every leaf first")
        reward = float(node.reward)
        if not math.isfinite(reward):
            raise ValueError(f"a leaf at depth {node.depth} has reward {reward}: rewards must be finite numbers")
        node.value = reward
    else:
        child_values = [_assign_values(child) for child in node.children]
        node.value = sum(child_values) / len(child_values)
    return node.value


def group_advantages(values: list[float], norm: str = "std", eps: float = 1e-6) -> list[float]:
    """GRPO's advantages for one group of sibling values.

    std:       A = (V - mean) / (std + eps), std with Bessel's correction (as torch.std, TRL's GRPO)
    bernoulli: A = (V - mu) / (mu (1 - mu) + eps), mu = mean (the published TreeRPO code)
    none:      A = V - mean

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


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation with Bessel's correction (as torch.std); std 0 for one value."""
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(variance)


# ----------------------------------------------------------------------------------------------
# 4. The loss: PPO-clip on every kept node's tokens, each node counted once


def leaf_path_rows(root: TreeNode) -> list[dict]:
    """One teacher-forcing row per leaf: the prompt and the path's segments, with per-token
    `advantages`, `old_logprobs` (NaN where not recorded) and `counted` (loss mask) lists.

    A node is counted in the row of the first leaf below it, so a segment shared by several
    leaves counts once. A row ends after its last counted node (later tokens cannot change
    earlier log-probs), and a row with nothing counted is left out.
    """
    rows, seen = [], set()
    for leaf in leaves(root):
        row = {"tokens": list(root.tokens), "advantages": [0.0] * len(root.tokens),
               "old_logprobs": [math.nan] * len(root.tokens), "counted": [False] * len(root.tokens)}
        end = 0
        for node in path_from_root(leaf):
            counted = node not in seen and node.advantage is not None
            seen.add(node)
            row["tokens"] += node.tokens
            row["advantages"] += [node.advantage if counted else 0.0] * len(node.tokens)
            row["old_logprobs"] += node.logprobs if node.logprobs is not None else [math.nan] * len(node.tokens)
            row["counted"] += [counted] * len(node.tokens)
            end = len(row["tokens"]) if counted else end
        if end:
            rows.append({key: values[:end] for key, values in row.items()})
    return rows


def tree_packed_row(root: TreeNode) -> dict | None:
    """The whole tree as one row, for `backward_loss(packed=True)`: the prompt, then depth-first
    every node with something counted at or below it, each segment once. Beside the keys of
    `leaf_path_rows` it holds per token `positions` (its position on its own path), `previous`
    (the index of the token before it on its path, whose logits predict it) and `attention`
    (T, T): token i sees token j when j <= i and j's node is i's node or one of its ancestors.
    None when nothing is counted.
    """
    packed = [root] + [node for node in nodes(root)[1:] if any(n.advantage is not None for n in nodes(node))]
    if len(packed) == 1:
        return None
    row = {key: [] for key in ("tokens", "advantages", "old_logprobs", "counted", "positions", "previous")}
    owner, last = [], {}  # owner: the packed node of each token; last: each node's last token index
    for slot, node in enumerate(packed):
        start, length, counted = len(row["tokens"]), len(node.tokens), node.advantage is not None
        parent_last = last[node.parent] if node.parent is not None else None
        first_position = row["positions"][parent_last] + 1 if parent_last is not None else 0
        row["tokens"] += node.tokens
        row["advantages"] += [node.advantage if counted else 0.0] * length
        row["old_logprobs"] += node.logprobs if node.logprobs is not None else [math.nan] * length
        row["counted"] += [counted] * length
        row["positions"] += range(first_position, first_position + length)
        row["previous"] += [parent_last if parent_last is not None else -1] + list(range(start, start + length - 1))
        owner += [slot] * length
        last[node] = start + length - 1
    slot_of = {node: slot for slot, node in enumerate(packed)}
    sees = torch.zeros(len(packed), len(packed), dtype=torch.bool)  # sees[a, b]: b is a or an ancestor of a
    for node in packed:
        for step in path_from_root(node) + [root]:
            sees[slot_of[node], slot_of[step]] = True
    owner = torch.tensor(owner)
    row["attention"] = sees[owner][:, owner].tril()  # (T, T)
    return row


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0, columns=None, predictors=None,
                   positions=None):
    """Teacher-forced log p(token | the tokens before it) under softmax(logits / temperature).

    input_ids: (rows, T); attention_mask: (rows, T), or (rows, 1, T, T) for a packed tree.
    columns: the columns t to score, (K,); by default 1 .. T-1. predictors: (K,) the column whose
    logits predict each, by default t - 1 (in a packed tree a segment's first token follows its
    parent's last). positions: (rows, T) position ids, by default from the mask. Returns (rows, K).
    """
    if columns is None:
        columns = torch.arange(1, input_ids.shape[1], device=input_ids.device)
    predictors = columns - 1 if predictors is None else predictors
    positions = position_ids(attention_mask) if positions is None else positions
    # logits_to_keep: project onto the vocabulary only where a token is scored. The prompt's
    # positions need none; with Qwen's 151k vocabulary this cut the bench's loss step 12x (CPU).
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions,
                   logits_to_keep=predictors).logits  # (rows, K, V)
    logits = logits.float() / temperature
    targets = input_ids[:, columns, None]
    # log_softmax gathered at the target, without materialising a second (rows, K, V) tensor
    return (logits.gather(-1, targets) - logits.logsumexp(-1, keepdim=True)).squeeze(-1)


def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, clip_eps=0.2, kl_coef=0.0):
    """Per-token PPO clipped surrogate with an optional k3 KL penalty, summed over `mask`.

    All inputs (rows, T). Returns (sum of per-token losses, dict of sums for the stats).
        r = exp(logp - logp_old)
        loss = -min(r A, clip(r, 1 - eps, 1 + eps) A) + kl_coef * (exp(ref - logp) - (ref - logp) - 1)
    """
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    loss = -surrogate
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1  # k3: unbiased, always >= 0
        loss = loss + kl_coef * kl
    mask = mask.float()
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return (loss * mask).sum(), {"kl": (kl.detach() * mask).sum().item(), "clipped": (clipped * mask).sum().item()}


def backward_loss(model, trees: list[TreeNode], *, ref_model=None, kl_coef: float = 0.0, clip_eps: float = 0.2,
                  temperature: float = 1.0, micro_batch_size: int = 8, packed: bool = False) -> tuple[float, dict]:
    """Compute the TreeRPO loss over scored trees and back-propagate it; the caller steps the optimizer.

    The loss is the mean over every counted token of the batch (SPEC §4). It is computed and
    back-propagated micro-batch by micro-batch (each part scaled by its share of the tokens), so
    that memory holds one micro-batch's activations, not the whole batch's. Old log-probs are the
    recorded sampling-time ones; where none were recorded the update is taken as on-policy
    (ratio 1, plain policy gradient). Returns the loss value and a dict of stats.

    packed=False: one row per leaf path (`leaf_path_rows`), `micro_batch_size` rows a forward;
    shared prefixes are forwarded once per leaf. packed=True: one row per tree (`tree_packed_row`)
    with a tree attention mask, one tree a forward; every token is forwarded once. Needs the
    model's attention to take a custom 4D mask: attn_implementation "sdpa" or "eager".
    """
    _check_loss_args(trees, ref_model, kl_coef, temperature, micro_batch_size)
    if packed:
        _check_packable(model)
        rows, micro_batch_size = [row for root in trees if (row := tree_packed_row(root))], 1
    else:
        rows = [row for root in trees for row in leaf_path_rows(root)]
    rows.sort(key=lambda row: len(row["tokens"]))  # similar lengths per micro-batch: less padding
    generated = [node for root in trees for node in nodes(root)[1:]]
    kept = [node for node in generated if node.advantage is not None]
    tokens = sum(sum(row["counted"]) for row in rows)
    stats = {"tokens": tokens, "kept_nodes": len(kept), "pruned_nodes": len(generated) - len(kept),
             "mean_abs_advantage": sum(abs(node.advantage) for node in kept) / max(len(kept), 1),
             "positions": sum(len(row["tokens"]) for row in rows), "logit_positions": 0, "kl": 0.0,
             "clip_fraction": 0.0}
    total_loss = 0.0
    for start in range(0, len(rows), micro_batch_size):
        batch = collate(rows[start:start + micro_batch_size], model)
        columns = batch["counted"].any(0).nonzero().squeeze(1)  # (K,) columns where some row is counted
        inputs = (batch["input_ids"], batch["attention_mask"], temperature, columns, batch["previous"][columns],
                  batch["positions"])
        logprobs = token_logprobs(model, *inputs)  # (rows, K)
        ref_logprobs = None
        if kl_coef:
            with torch.no_grad():
                ref_logprobs = token_logprobs(ref_model, *inputs)
        old_logprobs = batch["old_logprobs"][:, columns]
        old_logprobs = torch.where(old_logprobs.isnan(), logprobs.detach(), old_logprobs)
        loss_sum, sums = ppo_clip_loss(logprobs, old_logprobs, batch["advantages"][:, columns],
                                       batch["counted"][:, columns], ref_logprobs, clip_eps, kl_coef)
        stats["logit_positions"] += logprobs.numel()
        (loss_sum / tokens).backward()
        total_loss += loss_sum.item() / tokens
        stats["kl"] += sums["kl"] / tokens
        stats["clip_fraction"] += sums["clipped"] / tokens
    return total_loss, stats


def collate(rows: list[dict], model) -> dict:
    """Right-pad rows of `leaf_path_rows` into (rows, T) tensors on the model's device: input_ids,
    attention_mask, positions, advantages, old_logprobs, counted, and previous (T,), the column
    that predicts each. Padding is never counted, whatever token fills it. A packed tree
    (`tree_packed_row`, one per batch) brings its own positions, predecessors and 4D mask."""
    input_ids, attention_mask = pad_rows([row["tokens"] for row in rows], pad_id=0, side="right")
    width = input_ids.shape[1]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": position_ids(attention_mask),
             "previous": torch.arange(width) - 1}
    if "attention" in rows[0]:
        (row,) = rows
        batch |= {"attention_mask": _mask_4d(row["attention"], model), "positions": torch.tensor([row["positions"]]),
                  "previous": torch.tensor(row["previous"])}
    for key, fill, dtype in (("advantages", 0.0, torch.float), ("old_logprobs", math.nan, torch.float),
                             ("counted", False, torch.bool)):
        batch[key] = torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in rows], dtype=dtype)
    return {key: tensor.to(model.device) for key, tensor in batch.items()}


def _mask_4d(sees, model):
    """A (T, T) "may attend" matrix as the (1, 1, T, T) mask the attention uses as given:
    boolean for sdpa, 0 / -inf-like floats added to the scores for eager."""
    if model.config._attn_implementation == "sdpa":
        return sees[None, None]
    return torch.zeros(sees.shape).masked_fill(~sees, torch.finfo(torch.float32).min)[None, None]


def _check_loss_args(trees, ref_model, kl_coef, temperature, micro_batch_size):
    if not isinstance(trees, (list, tuple)) or not all(isinstance(root, TreeNode) for root in trees):
        raise ValueError(f"trees must be a list of TreeNode roots, got {type(trees).__name__}")
    unscored = [i for i, root in enumerate(trees) if root.value is None]
    if unscored:  # else its loss would be 0 with 0 tokens, indistinguishable from "everything pruned"
        raise ValueError(f"tree {unscored[0]} has no values or advantages: call assign_advantages(root) first")
    if kl_coef and ref_model is None:
        raise ValueError("kl_coef > 0 needs ref_model, the frozen starting model")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (the one sampled with), got {temperature!r}")
    _check_count("micro_batch_size", micro_batch_size)


def _check_packable(model):
    if model.config._attn_implementation not in ("sdpa", "eager"):
        raise ValueError("packed=True needs an attention that takes a custom 4D mask: load the model with "
                         f"attn_implementation='sdpa' or 'eager', not {model.config._attn_implementation!r}")
