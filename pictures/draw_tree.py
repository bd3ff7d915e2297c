"""A tree drawn as a picture: each node a box with its segment's text, its value V and advantage A,
coloured by A (red below 0, green above), the nodes of pruned groups grey. Depth runs left to
right, one leaf a row; a parent sits level with the middle of its children.

    python -m pictures.draw_tree out/smollm2 docs/tree.png   # the README's real tree (SmolLM2, seed 4)
    python -m pictures.draw_tree --tiny docs/tiny-tree.png  # a tiny random model's, offline

Needs matplotlib (the optional plotting dependency).
"""

import argparse
import textwrap

from pictures.plots import pyplot
from pictures.tree_text import REAL_QUESTION, REAL_SEED, real_tree, scored_tree, letter_model
from treerpo import TreeNode, leaves, nodes

BOX_CHARACTERS, BOX_LINES = 30, 4  # a segment's text wrapped in the box


def node_rows(root: TreeNode) -> dict:
    """{node: its row}: leaves on rows 0, 1, ... top to bottom, a parent at the mean of its children."""
    rows = {leaf: float(number) for number, leaf in enumerate(leaves(root))}
    for node in reversed(nodes(root)):  # children before parents
        if node.children:
            rows[node] = sum(rows[child] for child in node.children) / len(node.children)
    return rows


def box_text(node: TreeNode, tokenizer, question: str | None) -> str:
    """The box's lines: the segment (or the question, at the root), then r, V and A."""
    text = question if node.parent is None and question else tokenizer.decode(node.tokens, skip_special_tokens=True)
    text = " ".join(text.replace("\n", " ↵ ").split())
    lines = textwrap.wrap(text, BOX_CHARACTERS)[:BOX_LINES] or ["(EOS)"]
    if len(textwrap.wrap(text, BOX_CHARACTERS)) > BOX_LINES:
        lines[-1] = lines[-1][:BOX_CHARACTERS - 1] + "…"
    figures = ([f"r={node.reward:g}"] if not node.children else []) + [f"V={node.value:.2f}"]
    if node.parent is not None:
        figures.append("pruned" if node.advantage is None else f"A={node.advantage:+.2f}")
    if node.finished:
        figures.append("EOS")
    return "\n".join(lines + ["  ".join(figures)])


def box_colour(node: TreeNode, colours) -> str:
    if node.parent is None:
        return "white"
    if node.advantage is None:
        return "#d9d9d9"  # a pruned group: no loss
    return colours(0.5 + max(-1.0, min(1.0, node.advantage / 1.5)) / 2)  # A = -1.5 .. +1.5 -> red .. green


def draw_tree(root: TreeNode, tokenizer, path: str, title: str, question: str | None = None) -> str:
    """Draw `root` (values and advantages assigned) into the image file `path`; returns the path."""
    plt = pyplot("drawing a tree")
    rows, depth = node_rows(root), max(node.depth for node in nodes(root))
    figure, axes = plt.subplots(figsize=(4.2 * (depth + 1), 1.25 * len(leaves(root)) + 1.2))
    colours = plt.get_cmap("RdYlGn")
    for node in nodes(root):
        for child in node.children:  # the edges first, under the boxes
            axes.plot([node.depth, child.depth], [rows[node], rows[child]], color="#888888", lw=1, zorder=1)
    for node in nodes(root):
        axes.text(node.depth, rows[node], box_text(node, tokenizer, question), ha="center", va="center", fontsize=8,
                  family="DejaVu Sans", zorder=2, linespacing=1.3,
                  bbox=dict(boxstyle="round,pad=0.4", facecolor=box_colour(node, colours), edgecolor="#555555"))
    axes.set_xlim(-0.5, depth + 0.5)
    axes.set_ylim(len(leaves(root)) - 0.4, -0.6)  # the first leaf on top
    axes.set_xticks(range(depth + 1), ["prompt"] + [f"depth {level}" for level in range(1, depth + 1)])
    axes.set_yticks([])
    for side in ("left", "right", "top", "bottom"):
        axes.spines[side].set_visible(False)
    axes.set_title(title, fontsize=10, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a model folder (python -m offline.smollm2 out/smollm2 makes one)")
    parser.add_argument("image", help="where to write the picture (.png or .svg)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model's tree instead, offline")
    parser.add_argument("--seed", type=int, default=REAL_SEED, help="sampling seed (default: %(default)s)")
    args = parser.parse_args(argv)
    pyplot("python -m pictures.draw_tree")  # before a model is loaded and a tree sampled
    if args.tiny:
        from offline.tiny import byte_tokenizer
        tokenizer = byte_tokenizer()
        root = scored_tree(letter_model(tokenizer), tokenizer, "Spell a word with an e: ",
                           lambda text: float("e" in text), branch=2, depth=3, segment_tokens=5, seed=args.seed)
        title, question = "A tiny random model's tree (N=2, D=3, L=5); reward 1 when the answer has an e", None
    elif args.model:
        root, tokenizer = real_tree(args.model, args.seed)
        title = ("SmolLM2-135M-Instruct, N=2, D=3, L=20, temperature 0.7, seed "
                 f"{args.seed}; r: the lenient GSM8K reward; V: the mean of the children's V;\n"
                 "A = (V − mean) / std among siblings (red < 0 < green); grey: a pruned group (all values equal)")
        question = REAL_QUESTION["question"]
    else:
        parser.error("give a model folder, or --tiny")
    print(f"wrote {draw_tree(root, tokenizer, args.image, title, question)}")


if __name__ == "__main__":
    main()
