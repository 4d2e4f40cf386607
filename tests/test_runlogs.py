"""Readers of training logs: Hugging Face, JSON lines, CSV, TensorBoard, the demo's JSON; run specs and
manifests; bad files name the file and the line."""
import json

import numpy as np
import pytest

from hrmloss.runs.logs import guess_columns, parse_run_spec, read_manifest, read_runs


def _series(run, key):
    steps, values = run.series[key]
    return steps.tolist(), values.tolist()


def test_hugging_face_trainer_state(tmp_path):
    hist = [{"epoch": 0.1, "step": 10, "loss": 3.0, "learning_rate": 1e-4, "num_input_tokens_seen": 40960},
            {"epoch": 0.2, "step": 20, "loss": 2.5, "learning_rate": 1e-4, "num_input_tokens_seen": 81920},
            {"epoch": 0.2, "step": 20, "eval_loss": 2.7, "eval_runtime": 1.0},
            {"epoch": 0.3, "step": 30, "loss": 2.2, "num_input_tokens_seen": 122880},
            {"step": 30, "train_loss": 2.6, "train_runtime": 99.0}]  # the Trainer's closing summary
    path = tmp_path / "run1" / "trainer_state.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"global_step": 30, "log_history": hist}))
    (run,) = read_runs(path, meta={"N": 134e6})
    assert run.name == "run1" and run.meta == {"N": 134e6}
    assert _series(run, "loss") == ([10, 20, 30], [3.0, 2.5, 2.2])  # not the closing train_loss
    assert _series(run, "eval_loss") == ([20], [2.7])
    np.testing.assert_array_equal(run.tokens("loss"), [40960, 81920, 122880])
    assert run.positions is None


def test_json_lines_with_per_position_losses(tmp_path):
    path = tmp_path / "run.jsonl"
    lines = [{"step": s, "train/loss": 3 / s, "train/kl": 0.1 * s, "train/ce": 2 / s} for s in range(1, 6)]
    lines.insert(3, {"step": 3, "eval/loss": 2.0, "position_loss": [3.0, 2.5, 2.2]})
    lines.append({"step": 6, "eval/loss": 1.9, "position_loss": [2.9, 2.4]})  # a shorter curve: NaN-padded
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    (run,) = read_runs(path, meta={"tokens_per_step": 512})
    assert _series(run, "loss")[0] == [1, 2, 3, 4, 5] and _series(run, "kl")[1][0] == pytest.approx(0.1)
    assert _series(run, "eval_loss") == ([3, 6], [2.0, 1.9])
    np.testing.assert_array_equal(run.positions["step"], [3, 6])
    np.testing.assert_array_equal(run.positions["loss"], [[3.0, 2.5, 2.2], [2.9, 2.4, np.nan]])
    np.testing.assert_array_equal(run.tokens("loss"), 512 * np.arange(1, 6))


def test_csv_guessed_and_given_columns(tmp_path):
    path = tmp_path / "wandb.csv"
    path.write_text("Step,train/loss,Eval Loss,lr\n1,3.0,,0.1\n2,2.5,2.8,0.1\n3,2.2,,0.1\n")
    (run,) = read_runs(path)
    assert _series(run, "loss") == ([1, 2, 3], [3.0, 2.5, 2.2]) and _series(run, "eval_loss") == ([2], [2.8])
    (given,) = read_runs(path, columns={"loss": "lr"})
    assert _series(given, "loss")[1] == [0.1, 0.1, 0.1]
    assert guess_columns(["iteration", "total_loss", "kl_div", "val_loss"]) == {
        "step": "iteration", "loss": "total_loss", "kl": "kl_div", "eval_loss": "val_loss"}


def test_csv_without_step_uses_the_row_number(tmp_path):
    path = tmp_path / "losses.tsv"
    path.write_text("loss\tce\n3.0\t2.9\n2.0\t1.9\n")
    (run,) = read_runs(path)
    assert _series(run, "loss") == ([1, 2], [3.0, 2.0])


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (pip install \"hrmloss[tensorboard]\")")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "tb") as w:
        for s in range(1, 6):
            w.add_scalar("train/loss", 3 / s, s)
            w.add_scalar("train/kl", 0.1 * s, s)
        w.add_scalar("eval/loss", 2.0, 5)
    (run,) = read_runs(tmp_path / "tb", meta={"name": "tb run"})
    assert run.name == "tb run"
    steps, values = _series(run, "loss")
    assert steps == [1, 2, 3, 4, 5] and values == pytest.approx([3 / s for s in range(1, 6)])
    assert _series(run, "eval_loss") == ([5], [2.0])


def test_the_demo_json(tmp_path):
    train = {"step": [1, 2, 3], "tokens": [64, 128, 192], "loss": [3.0, 2.5, 2.2], "ce": [3.0, 2.4, 2.1],
             "kl": [0.0, 0.1, 0.2]}
    ev = {"step": [1, 3], "ce": [2.9, 2.3], "position_ce": [[3.0, 2.8], [2.5, 2.2]]}
    doc = {"config": {}, "reference": {"train": train, "eval": ev},
           "runs": {"0.5": {"train": train, "eval": ev}, "10.0": {"train": train, "eval": ev}}}
    (tmp_path / "demo.json").write_text(json.dumps(doc))
    runs = read_runs(tmp_path / "demo.json")
    assert [r.name for r in runs] == ["reference", "hrm=0.5", "hrm=10"]
    assert [r.meta.get("hrm") for r in runs] == [None, 0.5, 10.0]
    assert runs[0].meta["phase"] != runs[1].meta["phase"]  # pre-training and fine-tuning: two step axes
    assert _series(runs[1], "eval_loss") == ([1, 3], [2.9, 2.3])
    np.testing.assert_array_equal(runs[2].tokens("loss"), [64, 128, 192])


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"step": 1, "loss": 2}\n{"step": 2, "loss": \n', r"bad\.jsonl:2: not valid JSON"),
    ("list.jsonl", '{"step": 1, "loss": 2}\n[1, 2]\n', r"list\.jsonl:2: expected a JSON object"),
    ("word.jsonl", '{"step": 1, "loss": 2}\n\n{"step": 2, "loss": "high"}\n', r"word\.jsonl:3: column 'loss' is 'high'"),
    ("bad.csv", "step,loss\n1,2.0\n2,abc\n", r"bad\.csv:3: column 'loss' is 'abc'"),
    ("ragged.csv", "step,loss\n1,2.0\n2,1.5,9\n", r"ragged\.csv:3: 3 fields, expected 2"),
    ("empty.csv", "", r"empty\.csv:1: expected a header"),
    ("broken.json", '{"log_history": [\n{"step": 1,\n', r"broken\.json:3: not valid JSON"),
    ("nolossy.jsonl", '{"step": 1, "lr": 2}\n', r"nolossy\.jsonl: found no loss column"),
    ("odd.json", '{"hello": 1}', r"odd\.json: expected a trainer_state"),
    ("run.txt", "loss\n1\n", r"run\.txt: unknown log format"),
])
def test_bad_files_name_the_file_and_the_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_runs(tmp_path / name)


def test_missing_file_and_unknown_tokens(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_runs(tmp_path / "nope.jsonl")
    (tmp_path / "r.jsonl").write_text('{"step": 1, "loss": 2}\n')
    (run,) = read_runs(tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match="tokens_per_step"):
        run.tokens("loss")


def test_run_specs():
    assert parse_run_spec("runs/a.jsonl:N=134M:group=T_m=4:tokens_per_step=0.5M") == (
        "runs/a.jsonl", {"N": 134e6, "group": "T_m=4", "tokens_per_step": 0.5e6})
    assert parse_run_spec("a.csv:N=1.36B:hrm=0:name=big") == ("a.csv", {"N": 1.36e9, "hrm": 0.0, "name": "big"})
    for bad, message in (("a.csv:size=3", "not key=value"), ("a.csv:N=lots", "not a number"),
                         ("a.csv:N=-5", "expected a finite number > 0"), (":N=5", "expected PATH")):
        with pytest.raises(ValueError, match=message):
            parse_run_spec(bad)


def test_manifest(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"tokens_per_step": 1024, "runs": [
        {"path": "small/log.jsonl", "N": "53M", "group": "T_m=2"}, {"path": "big.csv", "N": 1.36e9}]}))
    assert read_manifest(tmp_path / "m.json") == [
        (str(tmp_path / "small/log.jsonl"), {"tokens_per_step": 1024.0, "N": 53e6, "group": "T_m=2"}),
        (str(tmp_path / "big.csv"), {"tokens_per_step": 1024.0, "N": 1.36e9})]
    (tmp_path / "bad.json").write_text(json.dumps([{"path": "a.csv", "size": 3}]))
    with pytest.raises(ValueError, match=r"runs\[0\]: unknown key 'size'"):
        read_manifest(tmp_path / "bad.json")
