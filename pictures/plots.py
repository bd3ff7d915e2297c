"""Curves of training runs: held-out accuracy against steps, tokens generated and seconds trained.

    python -m pictures.plots out/learn/treerpo-s0 out/learn/treerpo-s1 out/learn/grpo8-s0 ...

Each run's folder holds its metrics.jsonl and run.json (its flags); a method gets one colour, its
seeds line styles. Accuracy and reward are in percent on fixed 0-100 axes, so that a small change
does not fill a panel. Needs matplotlib (pip install matplotlib).
"""

import json
from pathlib import Path

# (y, x, title, percent): x is the step, or what the run had spent by then: tokens, seconds
PANELS = [("eval_lenient", "step", "held-out Pass@1, lenient", True),
          ("eval_lenient", "tokens", "held-out Pass@1, lenient, vs tokens generated", True),
          ("eval_lenient", "seconds", "held-out Pass@1, lenient, vs seconds trained", True),
          ("eval_strict", "step", "held-out Pass@1, strict", True),
          ("eval_response_tokens", "step", "held-out mean answer tokens", False),
          ("reward", "step", "training reward (% of leaves right)", True),
          ("response_tokens", "step", "training mean answer tokens (leaves)", False),
          ("tokens_generated", "step", "tokens generated a step", False),
          ("step_s", "step", "seconds a step (sampling + update)", False)]
STYLES = ["-", "--", ":", "-."]


def curve_points(records: list[dict], y: str, x: str) -> list[tuple[float, float]]:
    """(x, y) for every record that has `y`. x "tokens" and "seconds" are running totals up to and
    including that step: tokens_generated, and sample_s + loss_and_update_s (evaluation not counted)."""
    points, tokens, seconds = [], 0, 0.0
    for record in records:
        step_s = record.get("sample_s", 0.0) + record.get("loss_and_update_s", 0.0)
        tokens, seconds = tokens + (record.get("tokens_generated") or 0), seconds + step_s
        record = {**record, "step_s": step_s} if "sample_s" in record else record
        if record.get(y) is not None:
            points.append(({"step": record["step"], "tokens": tokens, "seconds": seconds}[x], record[y]))
    return points


def read_records(path: Path) -> list[dict]:
    """The complete records of a metrics.jsonl; a line cut short (a run still writing, or killed
    mid-line) is left out, not a crash."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def run_label(out_dir: Path) -> tuple[str, int | None]:
    """(method, seed) of a run: from its run.json (train_gsm8k.py and bench/bench_trl.py write one), else
    from a folder name like "grpo8-s1"."""
    run_file = out_dir / "run.json"
    if run_file.is_file():
        cfg = json.loads(run_file.read_text())
        method = {"treerpo": f"TreeRPO N={cfg.get('branch')} D={cfg.get('depth')} L={cfg.get('segment_tokens')}",
                  "grpo": f"GRPO G={cfg.get('width')}", "treepo": f"TreePO W={cfg.get('width')}"}.get(
            cfg.get("method"), cfg.get("method", out_dir.name))
        if cfg.get("tau", 0.1) != 0.1:
            method += f" tau={cfg['tau']:g}"
        return method, cfg.get("seed")
    name, _, seed = out_dir.name.rpartition("-s")
    return (name, int(seed)) if seed.isdigit() else (out_dir.name, None)


def pyplot(purpose: str):
    """matplotlib.pyplot, drawing into files (no screen needed), or a one-line exit that says how to
    install it. Called before anything slow, so that a missing matplotlib costs nothing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(f"{purpose} needs matplotlib, an optional dependency: pip install matplotlib")
    return plt


def plot(out_dirs: list[str], path: Path | None = None) -> Path:
    """Curves of one or more runs into `path` (default <first out dir>/curves.png)."""
    plt = pyplot("python -m pictures.plots")
    from matplotlib.ticker import MaxNLocator
    runs = [(Path(out_dir), *run_label(Path(out_dir))) for out_dir in out_dirs]
    methods = list(dict.fromkeys(method for _, method, _ in runs))
    seeds = sorted({seed for _, _, seed in runs if seed is not None})
    colours = plt.get_cmap("tab10")
    figure, axes = plt.subplots(3, 3, figsize=(18, 11))
    questions = set()
    for out_dir, method, seed in runs:
        records = read_records(out_dir / "metrics.jsonl")
        questions |= {record["eval_questions"] for record in records if "eval_questions" in record}
        style = STYLES[seeds.index(seed) % len(STYLES)] if seed is not None else "-"
        for axis, (y, x, _, percent) in zip(axes.flat, PANELS):
            points = curve_points(records, y, x)
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, [value * 100 for value in ys] if percent else ys, style, marker=".",
                          color=colours(methods.index(method) % 10),
                          label=f"{method}, seed {seed}" if seed is not None else method)
    evaluated = f" ({'/'.join(map(str, sorted(questions)))} questions)" if questions else ""
    for axis, (y, x, title, percent) in zip(axes.flat, PANELS):
        axis.set_title(title + (evaluated if y.startswith("eval_") else ""), fontsize=10)
        axis.set_xlabel({"step": "step", "tokens": "tokens generated", "seconds": "seconds trained"}[x])
        if x == "step":
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if percent:
            axis.set_ylim(0, 100)
            axis.set_ylabel("%")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.79, 0.5), fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0, 0.78, 1))
    path = path or Path(out_dirs[0]) / "curves.png"
    figure.savefig(path, dpi=60)
    plt.close(figure)
    return path


def main(argv=None):
    import sys
    out_dirs = sys.argv[1:] if argv is None else argv
    missing = [folder for folder in out_dirs if not (Path(folder) / "metrics.jsonl").is_file()]
    if missing or not out_dirs:
        raise SystemExit(f"no metrics.jsonl in {', '.join(missing) or 'no folder given'}")
    print(f"wrote {plot(out_dirs)}")


if __name__ == "__main__":
    main()
