"""probes/credit.py, the credit experiment's reader: the opening classes by hand, and the run summary
against the records it summarises (a --smoke run, tiny model, seconds)."""

import gzip
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from probes import credit
import train_gsm8k


@pytest.mark.parametrize("text, expected", [
    ("Tom has 4 + 3 = 7 apples.", "right intermediate"),   # the first step's result
    ("He has 4 + 3 + 2 = 9.", "final answer"),              # the answer without the intermediate
    ("Tom has 4 + 3 = 8 apples.", "wrong number"),          # a number not in the question
    ("Tom has 4 apples and 3 more", "no result yet"),       # only the question's numbers
])
def test_opening_classes(text, expected):
    question = "Tom has 4 apples, buys 3 and then 2 more. How many?"
    assert credit.opening_class(text, question, intermediate="7", final="9") == expected


def test_two_step_leaves_out_ambiguous_problems():
    assert credit.two_step({"question": "Add 2 and 3, then 4.", "answer": "2 + 3 = <<2+3=5>>5\n5 + 4 = <<5+4=9>>9\n#### 9"}) == ("5", "9")
    assert credit.two_step({"question": "Add 2 and 3, then 5.", "answer": "2 + 3 = <<2+3=5>>5\n5 + 5 = <<5+5=10>>10\n#### 10"}) is None


def test_phases_split_the_steps_in_four():
    assert credit.phases(20) == ((1, 5), (6, 10), (11, 15), (16, 20))  # the 135M runs' tables
    assert credit.phases(12) == ((1, 3), (4, 6), (7, 9), (10, 12))    # the 0.5B runs'
    assert credit.phases(10) == ((1, 3), (4, 6), (7, 9), (10, 10))


def test_the_credit_table_counts_positive_advantages(monkeypatch):
    found = [(1, "right intermediate", 0.5), (2, "right intermediate", -0.2), (12, "right intermediate", None),
             (12, "wrong number", -1.0)]
    monkeypatch.setattr(credit, "openings", lambda run, tokenizer, segment_tokens, credit="saved": iter(found))
    table = credit.credit_table(["run"], tokenizer=None, segment_tokens=192)
    assert table["right intermediate"]["all"] == (pytest.approx(0.15), 2, 3, 1)  # mean of the trained, counts, A > 0
    assert table["right intermediate"][(1, 3)] == (pytest.approx(0.15), 2, 2, 1)
    assert table["wrong number"][(10, 12)] == (-1.0, 1, 1, 0)
    assert "right intermediate 1/2, final answer 0/0, wrong number 0/1" in credit.markdown("treerpo", table)


def test_summary_adds_up_the_records(tmp_path):
    out = tmp_path / "treerpo-s0"
    train_gsm8k.main(["--smoke", "--out", str(out), "--eval-size", "2", "--eval-every", "2", "--show-tree-every", "0"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "sample_s" in record]
    figures = credit.run_summary(out)
    assert figures["tokens"] == sum(record["tokens_generated"] for record in steps)
    assert figures["kept_nodes"] == [record["kept_nodes"] for record in steps]
    assert figures["eval_steps"] == [0, 2, 4] and figures["steps"] == 4
    assert figures["leaves_per_question"] == pytest.approx(sum(r["leaves"] for r in steps) / len(steps) / 4)
    table = credit.summary_tables([out])
    assert "| treerpo-s0 |" in table and "| treerpo | 1 |" in table
    (out / "run.json").write_text(json.dumps({**json.loads((out / "run.json").read_text()), "steps": 6}))
    unfinished = credit.summary_tables([out])  # a run that has not reached its last step is in no method's row
    assert "| treerpo-s0 (to step 4, not in the method's row) |" in unfinished and "| treerpo | 1 |" not in unfinished


def test_credited_openings_counts_the_depth_one_nodes_with_an_advantage(tmp_path):
    def tree(*advantages):  # a root, its openings with these advantages, and one grandchild that is not counted
        nodes = [{"parent": -1, "advantage": None}] + [{"parent": 0, "advantage": a} for a in advantages]
        return {"nodes": nodes + [{"parent": 1, "advantage": 0.7}]}
    records = [{"step": 1, "trees": [tree(0.5, None)]}, {"step": 2, "trees": [tree(None, None, None), tree(-1.0, 1.0)]}]
    (tmp_path / "trees.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert credit.credited_openings(tmp_path) == 3 / 7
    assert credit.credited_openings(tmp_path / "no-trees") is None
    gzipped = tmp_path / "gzipped"  # as docs/runs keeps a run's trees
    gzipped.mkdir()
    (gzipped / "trees.jsonl.gz").write_bytes(gzip.compress((tmp_path / "trees.jsonl").read_bytes()))
    assert credit.credited_openings(gzipped) == 3 / 7


def test_tied_groups_by_level(tmp_path):
    # one tree: openings 1 and 2 credited; below 1 a tied pair, below 2 a credited pair, below 5 a lone child (no group);
    # another tree: its openings tied
    nodes = [{"parent": -1, "advantage": None}, {"parent": 0, "advantage": 0.5}, {"parent": 0, "advantage": -0.5},
             {"parent": 1, "advantage": None}, {"parent": 1, "advantage": None},
             {"parent": 2, "advantage": 1.0}, {"parent": 2, "advantage": -1.0}, {"parent": 5, "advantage": None}]
    tied_root = [{"parent": -1, "advantage": None}, {"parent": 0, "advantage": None}, {"parent": 0, "advantage": None}]
    records = [{"step": 1, "trees": [{"nodes": nodes}, {"nodes": tied_root}]}]
    (tmp_path / "trees.jsonl").write_text(json.dumps(records[0]) + "\n")
    assert credit.tied_groups(tmp_path) == (1 / 2, 1 / 2)
    assert credit.tied_groups(tmp_path / "no-trees") is None


def test_the_grid_reports_each_cell_on_the_same_questions(tmp_path, capsys):
    """probes/grid.py on a tiny model: one row a cell (a temperature and a per-level layout), the
    figures kept in cells.json and printed again by --show."""
    from offline.tiny import byte_tokenizer, tiny_model
    from probes import grid
    tokenizer = byte_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    grid.main(["--model", str(tmp_path / "tiny"), "--data", "smoke", "--questions", "3", "--batch", "2",
               "--cells", "0.7:2x4,2x4", "1.0:3x2,2x6", "--out", str(tmp_path / "grid")])
    printed = capsys.readouterr().out
    cells = json.loads((tmp_path / "grid" / "cells.json").read_text())["cells"]
    assert list(cells) == ["0.7:2x4,2x4", "1.0:3x2,2x6"] and all(cell["questions"] == 3 for cell in cells.values())
    assert cells["1.0:3x2,2x6"]["groups_by_level"][0] == 3 and len(cells["0.7:2x4,2x4"]["tied_by_level"]) == 2
    assert grid.Config(layout="4x96,4x288").levels() == ([4, 4], [96, 288])
    grid.main(["--show", str(tmp_path / "grid")])
    shown = capsys.readouterr().out
    assert shown.strip().startswith("| cell (T: layout) |") and printed.rstrip().endswith(shown.strip())
    assert "| cell | norm | gap 0.1-0.25 |" in shown
    # a later run of the same settings adds its cells; one of other settings is refused before sampling
    same = ["--model", str(tmp_path / "tiny"), "--data", "smoke", "--questions", "3", "--batch", "2"]
    grid.main(same + ["--cells", "1.2:2x4,2x4", "--out", str(tmp_path / "grid")])
    assert list(json.loads((tmp_path / "grid" / "cells.json").read_text())["cells"]) == [
        "0.7:2x4,2x4", "1.0:3x2,2x6", "1.2:2x4,2x4"]
    with pytest.raises(SystemExit, match="holds cells of other settings"):
        grid.main(same + ["--seed", "1", "--cells", "0.7:2x4,2x4", "--out", str(tmp_path / "grid")])
