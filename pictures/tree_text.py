"""Seeing the trees: `format_tree` draws one as text (and `format_budgeted_tree` a TreePO tree);
the README's five pictures show how TreeRPO samples, values, groups, credits and trains one tree.

    python -m pictures.tree_text                      # from a tiny random model nudged toward letters, offline, seconds
    python -m pictures.tree_text --real out/smollm2   # from a real model folder (offline/smollm2.py): the README's pictures

The tree, the values (r on the leaves, V = mean of the children's V), the sibling groups, the
advantages, and the packed row the loss forwards (each segment once, each seeing only its path).
"""

import argparse

import torch

from reward import chat_prompt, gsm8k_reward
from offline.tiny import byte_tokenizer, tiny_model
from treerpo import (TreeNode, assign_advantages, leaves, mean_and_std, nodes, packed_rows, response_tokens,
                     sample_trees)


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


def format_budgeted_tree(root: TreeNode, tokenizer, width: int = 40) -> str:
    """`format_tree` of a TreePO tree, with what TreePO adds: why each leaf stopped
    (EOS, depth, repetition), fallback branches, and each leaf's advantage. Inner nodes have no
    advantage of their own in TreePO: they show their value only."""
    lines = format_tree(root, tokenizer, width, show=("reward", "value")).split("\n")
    for number, node in enumerate(nodes(root)):  # format_tree prints the nodes in this order
        marks = [node.stop if node.stop != "eos" else ""] if not node.children else []
        marks += ["fallback"] if node.fallback else []
        marks += [f"A={node.advantage:+.2f}"] if node.advantage is not None else []
        lines[number] += "".join("  " + mark for mark in marks if mark)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The five pictures


def letter_model(tokenizer, seed: int = 0):
    """A tiny random model whose head is nudged toward lowercase letters and spaces, so that its
    segments print as text, and toward EOS, so that some paths stop early."""
    model = tiny_model(len(tokenizer), init_std=0.02, seed=seed)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
    with torch.no_grad():
        model.lm_head.bias[tokenizer("abcdefghijklmnopqrstuvwxyz ", add_special_tokens=False).input_ids] = 6.0
        model.lm_head.bias[tokenizer.eos_token_id] = 3.0
    return model


def packed_row_picture(root, tokenizer, width: int = 12) -> str:
    """The tree as the loss forwards it (`treerpo.packed_rows`): one row, each segment once, depth
    first; a segment attends to the prompt and to the segments of its own path, never to another
    branch. Pruned segments with nothing trained below are not forwarded at all."""
    (row,) = packed_rows(root, max_tokens=10**9)
    members, lines = row["members"], []
    for slot, node in enumerate(members[1:], start=1):
        text = repr(tokenizer.decode(node.tokens)[:width])
        trained = f"A={node.advantage:+.2f}" if node.advantage is not None else "pruned, context only"
        path = ", ".join(["prompt"] + [str(other) for other in range(1, slot) if row["sees"][slot, other]])
        lines.append(f"{slot:2} d{node.depth} {text:16} {trained:21} sees {path}")
    left_out = [node for node in nodes(root)[1:] if node not in members]
    if left_out:
        lines.append(f"not forwarded: {len(left_out)} pruned segments with nothing trained below them")
    return "\n".join(lines)


def scored_tree(model, tokenizer, prompt: str, verifier, *, branch: int, depth: int, segment_tokens: int,
                seed: int = 0, temperature: float = 1.0) -> TreeNode:
    """Sample one tree, reward its leaves with verifier(response text), fill values and advantages."""
    torch.manual_seed(seed)
    (root,) = sample_trees(model, tokenizer, [prompt], branch=branch, depth=depth, segment_tokens=segment_tokens,
                           temperature=temperature)
    for leaf in leaves(root):
        leaf.reward = verifier(tokenizer.decode(response_tokens(leaf), skip_special_tokens=True))
    assign_advantages(root)
    return root


def five_pictures(root: TreeNode, tokenizer, *, branch: int, depth: int, segment_tokens: int, width: int = 40) -> str:
    """One scored tree shown the five ways the README does: the tree, the values, the sibling
    groups, the advantages, and the packed row the loss trains."""
    show = lambda fields: format_tree(root, tokenizer, width=width, show=fields)  # noqa: E731
    return "\n".join([
        f"1. The tree: branch={branch}, depth={depth}, segment_tokens={segment_tokens}\n" + show(()),
        "\n2. The values: r on each leaf, V = mean of the children's V\n" + show(("reward", "value")),
        "\n3. The sibling groups: each parent's children, their mean and std\n" + show(("value", "group")),
        "\n4. The advantages: A = (V - mean) / std within the group; groups spanning < tau: pruned\n"
        + show(("value", "advantage")),
        "\n5. The loss: the tree packed into one row, each segment once, under a tree mask\n"
        + packed_row_picture(root, tokenizer)])


def tiny_pictures() -> str:
    """A tiny random model nudged toward letters; reward 1 when the response has an "e"."""
    tokenizer = byte_tokenizer()
    root = scored_tree(letter_model(tokenizer), tokenizer, "Spell a word with an e: ", lambda text: float("e" in text),
                       branch=2, depth=3, segment_tokens=5)
    return five_pictures(root, tokenizer, branch=2, depth=3, segment_tokens=5)


REAL_SEGMENT_TOKENS, REAL_TEMPERATURE, REAL_SEED = 20, 0.7, 4  # a seed whose tree has right and wrong leaves
REAL_QUESTION = {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "#### 7"}


def real_tree(model_dir: str, seed: int = REAL_SEED) -> tuple[TreeNode, object]:
    """SmolLM2-135M-Instruct (or any model folder) on an easy GSM8K-style question, with the demo's
    prompt and the lenient reward (`reward.chat_prompt`, `reward.gsm8k_reward`): (root, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    root = scored_tree(model, tokenizer, chat_prompt(tokenizer, REAL_QUESTION["question"]),
                       lambda text: gsm8k_reward(text, REAL_QUESTION["answer"]), branch=2, depth=3,
                       segment_tokens=REAL_SEGMENT_TOKENS, seed=seed, temperature=REAL_TEMPERATURE)
    return root, tokenizer


def real_pictures(model_dir: str, seed: int = REAL_SEED) -> str:
    root, tokenizer = real_tree(model_dir, seed)
    return five_pictures(root, tokenizer, branch=2, depth=3, segment_tokens=REAL_SEGMENT_TOKENS, width=48)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", metavar="MODEL_DIR", help="the five pictures from this model folder")
    parser.add_argument("--seed", type=int, default=REAL_SEED, help="sampling seed of --real (default: %(default)s)")
    args = parser.parse_args(argv)
    print(real_pictures(args.real, args.seed) if args.real else tiny_pictures())


if __name__ == "__main__":
    main()
