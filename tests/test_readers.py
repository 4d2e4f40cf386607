"""The readers over a corpus of malformed and real-world-shaped logs (issue 20, readers; issue 23 item 6).

Good files: what each series must hold is written out by hand from the file's rows, never read back with
the code under test. Bad files: through the CLI entry point, one line naming the file (and the line or
key), exit status 2, no traceback.
"""
import json

import pytest

from hrmloss.runs.cli import main
from hrmloss.runs.logs import read_runs
from hrmloss.runs.reports import grid_runs
from hrmloss.runs.scaling import _check_runs

from .test_cli import _fails  # (exit 2, one line on stderr, no traceback)


def _one(path, **kw):
    runs = read_runs(path, **kw)
    assert len(runs) == 1
    return runs[0]


def _series(run, key):
    steps, values = run.series[key]
    return steps.tolist(), values.tolist()


def _lines(rows, newline="\n"):
    return newline.join(rows) + newline


# Good files ---------------------------------------------------------------------------------------------

def test_csv_with_a_byte_order_mark_keeps_its_step_column(tmp_path):
    # Excel's "CSV UTF-8" writes EF BB BF before the header, and CRLF line ends.
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + _lines(["step,loss", "10,3.0", "20,2.5", "30,2.2"], "\r\n").encode())
    run = _one(path)
    assert _series(run, "loss") == ([10.0, 20.0, 30.0], [3.0, 2.5, 2.2])
    assert run.notes == []


@pytest.mark.parametrize("suffix, rows", [
    (".jsonl", [json.dumps({"step": s, "loss": v}) for s, v in ((10, 3.0), (20, 2.5), (30, 2.2))]),
    (".tsv", ["step\tloss", "10\t3.0", "20\t2.5", "30\t2.2"]),
])
@pytest.mark.parametrize("bom", [False, True])
def test_crlf_and_bom_in_json_lines_and_tsv(tmp_path, suffix, rows, bom):
    path = tmp_path / f"log{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" * bom + _lines(rows, "\r\n").encode())
    assert _series(_one(path), "loss") == ([10.0, 20.0, 30.0], [3.0, 2.5, 2.2])


def test_trainer_state_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "trainer_state.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"log_history": [{"step": 5, "loss": 2.0}]}).encode())
    assert _series(_one(path), "loss") == ([5.0], [2.0])


def test_rows_newest_first_are_sorted_by_step(tmp_path):
    path = tmp_path / "newest_first.csv"
    path.write_text(_lines(["iter,loss,eval_loss", "30,2.2,2.4", "20,2.5,", "10,3.0,3.1"]))
    run = _one(path)
    assert _series(run, "loss") == ([10.0, 20.0, 30.0], [3.0, 2.5, 2.2])
    assert _series(run, "eval_loss") == ([10.0, 30.0], [3.1, 2.4])
    assert run.notes == [f"{path}: rows not in step order (step 20 at {path}:3 after step 30 at {path}:2): "
                         "sorted by step"]


def test_a_resumed_run_keeps_the_last_value_of_a_repeated_step(tmp_path):
    # Steps 1..6 logged, the run crashed, resumed from its checkpoint at step 4: steps 5, 6 logged again.
    first = [{"step": s, "loss": 10.0 - s, "ce": 9.0 - s} for s in range(1, 7)]
    again = [{"step": s, "loss": 20.0 - s, "ce": 19.0 - s} for s in range(5, 9)]
    path = tmp_path / "resumed.jsonl"
    path.write_text(_lines([json.dumps(r) for r in first + again]))
    run = _one(path)
    assert _series(run, "loss") == ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                                    [9.0, 8.0, 7.0, 6.0, 15.0, 14.0, 13.0, 12.0])
    assert _series(run, "ce")[1] == [8.0, 7.0, 6.0, 5.0, 14.0, 13.0, 12.0, 11.0]
    assert run.notes == [f"{path}: 2 step(s) logged more than once (a resumed run?), the last kept: "
                         f"step 5 at {path}:5 and {path}:7, step 6 at {path}:6 and {path}:8"]
    # fit-grid takes the same series (it needs strictly increasing tokens): no refusal, the same note.
    run.meta.update(N=1e6, tokens_per_step=100.0)
    (name, n, group, tokens, loss), = _check_runs(grid_runs([run]))
    assert tokens.tolist() == [100.0 * s for s in range(1, 9)] and loss.tolist() == run.series["loss"][1].tolist()


def test_several_eval_sets_and_records_without_a_step(tmp_path):
    # Hugging Face with eval_dataset={"wiki": ..., "code": ...} logs eval_wiki_loss and eval_code_loss;
    # a JSON-lines logger's closing summary line has no step.
    rows = [{"step": 10, "loss": 3.0}, {"step": 10, "eval_wiki_loss": 3.3, "eval_code_loss": 2.9},
            {"step": 20, "loss": 2.5}, {"step": 20, "eval/wiki/loss": 3.1}, {"train_loss": 2.7, "runtime": 9.0}]
    path = tmp_path / "sets.jsonl"
    path.write_text(_lines([json.dumps(r) for r in rows]))
    run = _one(path)
    assert set(run.series) == {"loss", "eval_loss:wiki", "eval_loss:code"}
    assert _series(run, "eval_loss:code") == ([10.0], [2.9])
    assert _series(run, "loss") == ([10.0, 20.0], [3.0, 2.5])
    assert run.notes == [f"{path}: 1 record(s) without 'step' skipped ({path}:5)"]
    # The first alias of a name wins: eval_wiki_loss, and eval/wiki/loss is another column of the same set.
    assert _series(run, "eval_loss:wiki") == ([10.0], [3.3])


def test_the_row_number_is_the_step_without_a_step_column(tmp_path):
    path = tmp_path / "nostep.csv"
    path.write_text(_lines(["loss", "3.0", "2.5"]))
    run = _one(path)
    assert _series(run, "loss") == ([1.0, 2.0], [3.0, 2.5]) and run.notes == []


def _trainer_state(tmp_path, n, eval_sets=("wiki", "code"), tokens=False):
    """A Hugging Face trainer_state.json: a loss entry every 10 steps, eval every 50 (one entry per set),
    the closing summary entry (train_loss, train_runtime), no num_input_tokens_seen unless `tokens`."""
    hist = []
    for s in range(10, 10 * n + 1, 10):
        hist.append({"epoch": s / 1000, "grad_norm": 1.0, "learning_rate": 1e-4, "loss": 2 + 3 * s ** -0.3,
                     "step": s} | ({"num_input_tokens_seen": 4096 * s} if tokens else {}))
        if s % 50 == 0:
            for k, name in enumerate(eval_sets):
                hist.append({"epoch": s / 1000, f"eval_{name}_loss": 2.2 + k / 10 + 1 / s, f"eval_{name}_runtime": 1.0,
                             "step": s})
    hist.append({"epoch": n / 100, "step": 10 * n, "total_flos": 1e12, "train_loss": 2.4, "train_runtime": 60.0})
    folder = tmp_path / "checkpoint-100"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10 * n, "log_history": hist}))
    return folder / "trainer_state.json"


def test_trainer_state_without_token_counts_draws_loss_against_step(tmp_path, capsys):
    path = _trainer_state(tmp_path, 40)
    out = tmp_path / "out"
    assert main(["report", str(path), "--out", str(out), "--formats", "svg"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["drawn"] == ["(c) test_loss (2 curves)",
                            "pred_vs_real_steps (1 run, against steps: no usable token counts (give --tokens-per-step))"]
    assert doc["predictions"]["checkpoint-100"]["x"] == "steps" and doc["predictions"]["checkpoint-100"]["ok"]
    svg = (out / "test_loss.svg").read_text()
    assert "checkpoint-100: wiki" in svg and "checkpoint-100: code" in svg
    assert "Step" in (out / "pred_vs_real_steps.svg").read_text()
    text = (out / "report.txt").read_text()
    assert "every fit passed its checks (1 fit)" in text


def test_token_counts_or_tokens_per_step_give_a_tokens_axis(tmp_path, capsys):
    path = _trainer_state(tmp_path, 40, eval_sets=(), tokens=True)
    assert main(["report", str(path), "--out", str(tmp_path / "a"), "--formats", "svg"]) == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["drawn"] == ["pred_vs_real (1 run)"]
    assert "Tokens trained" in (tmp_path / "a" / "pred_vs_real.svg").read_text()
    plain = tmp_path / "plain.csv"
    plain.write_text("step,loss\n" + "".join(f"{s},{2 + 3 * s ** -0.3}\n" for s in range(1, 41)))
    assert main(["report", str(plain), "--tokens-per-step", "1k", "--out", str(tmp_path / "b"), "--formats", "svg"]) == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["predictions"]["plain"]["x"] == "tokens"


def test_a_short_log_is_drawn_and_nothing_fitted_is_not_called_a_pass(tmp_path, capsys):
    path = _trainer_state(tmp_path, 5, eval_sets=())  # 5 loss entries: too few for a Pred
    out = tmp_path / "out"
    assert main(["report", str(path), "--out", str(out), "--formats", "svg"]) == 0
    text = (out / "report.txt").read_text()
    assert "every fit passed" not in text
    assert "nothing was fitted (see the notes below)" in text
    assert "drew: training_loss (1 run)" in text
    assert "no Pred for 'checkpoint-100' (5 logged points, a Pred needs at least 10)" in text
    assert "Training loss" in (out / "training_loss.svg").read_text()


def test_a_resumed_run_is_read_the_same_by_report_and_fit_grid(tmp_path, capsys):
    path = tmp_path / "resumed.csv"
    rows = [f"{s},{2 + 3 * s ** -0.3}" for s in range(1, 31)] + [f"{s},{2 + 3 * s ** -0.3}" for s in range(21, 41)]
    path.write_text(_lines(["step,loss"] + rows))
    note = f"{path}: 10 step(s) logged more than once (a resumed run?), the last kept: step 21 at {path}:22 and {path}:32"
    assert main(["report", str(path), "--out", str(tmp_path / "r"), "--formats", "svg"]) == 0
    assert note in (tmp_path / "r" / "report.txt").read_text()
    # fit-grid on the same file (one size: few_sizes, but a law and its summary): the same note, no refusal.
    assert main(["fit-grid", "--run", f"{path}:N=1M", "--tokens-per-step", "1k", "--out", str(tmp_path / "g"),
                 "--formats", "svg"]) == 0
    assert note in (tmp_path / "g" / "scaling_law.txt").read_text()


# Bad files: one line, exit 2 ------------------------------------------------------------------------------



_GARBAGE = bytes(range(256)) * 4  # not UTF-8 (0x80 cannot start a character)
_DEMO_RUN = {"train": {"step": [1, 2], "loss": [3, 2], "ce": [3, 2], "kl": [0, 0], "tokens": [8, 16]},
             "eval": {"step": [2], "ce": [2.5], "position_ce": [[3, 2.5]]}}


def _without(doc, *keys):
    """A deep copy of `doc` with doc[k0][k1]...[kn] removed."""
    doc = json.loads(json.dumps(doc))
    inner = doc
    for k in keys[:-1]:
        inner = inner[k]
    del inner[keys[-1]]
    return doc


_DEMO = {"config": {}, "reference": _DEMO_RUN, "runs": {"0.5": _DEMO_RUN}}
_GRID = {"config": {}, "grid": [{"name": "a", "N": 1e4, "group": "T=64", "step": [1, 2], "loss": [3, 2],
                                 "tokens": [8, 16]}]}

BAD_FILES = [
    ("garbage.jsonl", _GARBAGE, "garbage.jsonl: not a UTF-8 text file (byte 0x80 at offset 128"),
    ("garbage.json", _GARBAGE, "garbage.json: not a UTF-8 text file"),
    ("garbage.csv", _GARBAGE, "garbage.csv: not a UTF-8 text file"),
    ("nul.csv", b"step,loss\n1,2\n\x00\x01\x02\n", "nul.csv:3: a NUL byte: not a text file"),
    ("negative.csv", b"step,loss\n1,2.0\n-5,1.9\n", "negative.csv:3: column 'step' is -5: expected a step >= 0"),
    ("negative.jsonl", b'{"step": 1, "loss": 2}\n{"step": -1, "loss": 2}\n', "negative.jsonl:2: column 'step' is -1"),
    ("cut.json", b'{"log_history": [{"step": 1, "loss"', "cut.json:1: not valid JSON"),
    ("trainer_state.json", b'{"log_history": []}', "trainer_state.json: log_history is empty"),
    ("demo.json", json.dumps(_without(_DEMO, "runs", "0.5", "train", "kl")).encode(),
     "demo.json: runs['0.5'].train: missing key 'kl'"),
    ("demo.json", json.dumps(_without(_DEMO, "reference", "eval")).encode(), "demo.json: reference: missing key 'eval'"),
    ("demo.json", json.dumps(_without(_DEMO, "reference", "eval", "position_ce")).encode(),
     "demo.json: reference.eval: missing key 'position_ce'"),
    ("demo.json", json.dumps(_DEMO | {"runs": {"0.5": _DEMO_RUN | {"train": _DEMO_RUN["train"] | {"ce": [1]}}}}).encode(),
     "demo.json: runs['0.5'].train: 'ce' is not a list of numbers of 2 rows"),
    ("grid.json", json.dumps(_without(_GRID, "grid", 0, "N")).encode(), "grid.json: grid[0]: missing key 'N'"),
    ("grid.json", json.dumps(_without(_GRID, "grid", 0, "tokens")).encode(), "grid.json: grid[0]: missing key 'tokens'"),
    ("grid.json", json.dumps(_GRID | {"grid": ["a"]}).encode(), "grid.json: grid[0]: expected an object with 'step'"),
]


@pytest.mark.parametrize("command", ["report", "fit-grid"])
@pytest.mark.parametrize("name, data, message", BAD_FILES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_FILES)])
def test_a_bad_file_is_one_line_naming_it(tmp_path, capsys, command, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    err = _fails([command, str(path), "--out", str(tmp_path / "out")], capsys)
    assert f"{tmp_path}/{message}" in err, err


def test_a_manifest_with_a_byte_order_mark_or_binary(tmp_path, capsys):
    from hrmloss.runs.logs import read_manifest

    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(b"\xef\xbb\xbf" + json.dumps({"runs": [{"path": "a.csv", "N": 1e6}]}).encode())
    assert read_manifest(manifest) == [(str(tmp_path / "a.csv"), {"N": 1e6})]
    manifest.write_bytes(_GARBAGE)
    err = _fails(["fit-grid", "--manifest", str(manifest), "--out", str(tmp_path / "out")], capsys)
    assert f"{manifest}: not a UTF-8 text file" in err


def test_step_zero_and_a_token_counter_reset(tmp_path, capsys):
    # An eval before training (step 0) is left out of the log-step charts and the fits, and said; a tokens
    # column that restarts (a resumed run's counter) gives a Pred against steps in report, an error in fit-grid.
    path = tmp_path / "reset.csv"
    path.write_text("step,loss,eval_loss,tokens\n0,5.0,5.1,0\n"
                    + "".join(f"{s},{2 + 1 / s},,{(s % 15 + 1) * 100}\n" for s in range(1, 40)) + "40,2.03,2.2,4000\n")
    assert main(["report", str(path), "--out", str(tmp_path / "r"), "--formats", "svg"]) == 0
    text = (tmp_path / "r" / "report.txt").read_text()
    assert "(c) reset: 1 point(s) at step 0 left out (charts and fits start at step 1)" in text
    assert "reset training loss: 1 point(s) at step 0 left out" in text
    assert f"reset ({path}): tokens do not increase with step (step 15: 100 after 1500 at step 14): Pred against steps" in text
    assert json.loads((tmp_path / "r" / "report.json").read_text())["predictions"]["reset"]["x"] == "steps"
    err = _fails(["fit-grid", "--run", f"{path}:N=1M", "--out", str(tmp_path / "g")], capsys)
    assert f"run 'reset' ({path}): tokens do not increase with step (step 15: 100 after 1500 at step 14)" in err


def test_only_step_zero_is_said_not_called_missing(tmp_path, capsys):
    path = tmp_path / "zero.csv"
    path.write_text("step,loss,eval_loss\n0,5.0,5.1\n")
    assert main(["report", str(path), "--out", str(tmp_path / "r"), "--formats", "svg"]) == 0
    text = (tmp_path / "r" / "report.txt").read_text()
    assert "(c) test_loss skipped: the eval losses are all at step 0" in text
    assert "no run logs a training loss" not in text and "every fit passed" not in text
    assert "nothing was fitted" in text and "drew nothing: no chart's data is in these logs" in text


def test_runs_that_share_a_name_are_all_drawn(tmp_path, capsys):
    # Two runs' checkpoint-100/trainer_state.json are both named checkpoint-100: neither may replace the other.
    paths = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        paths.append(_trainer_state(tmp_path / run, 20, eval_sets=()))
    assert main(["report", *map(str, paths), "--out", str(tmp_path / "out"), "--formats", "svg"]) == 0
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(doc["predictions"]) == [f"checkpoint-100 [{p}]" for p in paths]
    assert f"{paths[0]}: run name 'checkpoint-100' is shared by 2 runs" in "\n".join(doc["notes"])
