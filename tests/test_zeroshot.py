"""Zero-shot tasks through lm-eval with local documents: hand-checked accuracy, equality with lm-eval itself, errors.

lm-eval indexes its ~15k task configs once per process (seconds); the tests share that index.
"""

import json
import sys

import pytest
import torch

from conftest import REPO, SHARED, require_shared, snapshot
from lmprune.cli import main

pytest.importorskip("lm_eval")

ZEROSHOT = SHARED / "data" / "zeroshot"

# piqa evaluates on its validation split, arc_easy on test: the file name comes from each task's own config.
PIQA = [
    {"goal": "Lily wants to play in the park.", "sol1": "She runs outside with her ball.",
     "sol2": "She eats the big red car.", "label": 0},
    {"goal": "Tom is sad because his toy broke.", "sol1": "The sun jumps into the soup.",
     "sol2": "His mom hugs him and fixes the toy.", "label": 1},
    {"goal": "The dog is hungry.", "sol1": "It gets some food from a bowl.", "sol2": "It reads a long book.",
     "label": 0},
    {"goal": "Ben wants to go to sleep.", "sol1": "He sings very loud.", "sol2": "He goes to his bed.",
     "label": 0},
    {"goal": "The girl found a pretty flower.", "sol1": "She gave it to her mom.", "sol2": "She threw it at a bird.",
     "label": 1},
]
ARC = [
    {"id": "a1", "question": "What does a cat say?", "answerKey": "B",
     "choices": {"text": ["moo", "meow", "quack"], "label": ["A", "B", "C"]}},
    {"id": "a2", "question": "Where do fish live?", "answerKey": "C",
     "choices": {"text": ["in a tree", "in the sky", "in the water", "in a car"], "label": ["A", "B", "C", "D"]}},
    {"id": "a3", "question": "What color is the sky?", "answerKey": "1",
     "choices": {"text": ["blue", "green"], "label": ["1", "2"]}},
]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def stories(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(stories_path).eval(), AutoTokenizer.from_pretrained(stories_path)


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """sum log p(continuation | context), the continuation's tokens being those the pair adds to the context."""
    ctx, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
    assert whole[: len(ctx)] == ctx
    logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def hand_accuracy(model, tokenizer, docs):
    """(acc, acc_norm) from (context, choices, gold) by argmax of the log-likelihood, raw and per character."""
    hits = hits_norm = 0
    for context, choices, gold in docs:
        lls = [loglikelihood(model, tokenizer, context, " " + choice) for choice in choices]
        hits += max(range(len(choices)), key=lambda i: lls[i]) == gold
        hits_norm += max(range(len(choices)), key=lambda i: lls[i] / len(choices[i])) == gold
    return hits / len(docs), hits_norm / len(docs)


def test_accuracy_matches_hand_computed_loglikelihoods(capsys, tmp_path, stories, stories_path):
    model, tokenizer = stories
    write_jsonl(tmp_path / "data" / "piqa" / "validation.jsonl", PIQA)
    write_jsonl(tmp_path / "data" / "arc_easy" / "test.jsonl", ARC)
    piqa = hand_accuracy(model, tokenizer, [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])
                                            for d in PIQA])
    arc = hand_accuracy(model, tokenizer, [(f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                                            d["choices"]["label"].index(d["answerKey"])) for d in ARC])
    out = tmp_path / "results.json"
    code, text, err = run(capsys, "eval", stories_path, "--tasks", "piqa,arc_easy", "--task-data", tmp_path / "data",
                          "--json", out, "--device", "cpu", "--batch-size", 4, "--no-progress")
    assert code == 0, err
    results = json.loads(out.read_text())
    assert (results["piqa"]["acc,none"], results["piqa"]["acc_norm,none"]) == piqa
    assert (results["arc_easy"]["acc,none"], results["arc_easy"]["acc_norm,none"]) == arc
    assert piqa == (0.4, 0.8) and arc == (1 / 3, 1 / 3)  # the model is neither always right nor always wrong
    assert results["piqa"]["acc_stderr,none"] == pytest.approx((0.4 * 0.6 / 4) ** 0.5)  # sample std / √n
    # the printed table: one row per task with n, and the mean over both
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert rows["piqa"][1] == "5" and rows["arc_easy"][1] == "3"
    assert rows["mean"][1] == f"{(piqa[0] + arc[0]) / 2:.4f}"


def test_equals_simple_evaluate_called_directly(tmp_path, stories):
    """lmprune's route (lm-eval's configs, documents swapped in at download) against lm-eval's own local-data
    route (inline configs with dataset_path json), on the real sets: multiple-choice with Jinja and with
    Python prompts, and a log-likelihood task with a bootstrapped perplexity."""
    require_shared(ZEROSHOT)
    sys.path.insert(0, str(REPO / "bench"))
    from lm_eval_direct import direct_results

    from lmprune.zeroshot import run_tasks, task_manager, task_metrics

    model, tokenizer = stories
    tasks = ["piqa", "sglue_rte", "copa", "lambada_openai"]
    ours = task_metrics(run_tasks(model, tokenizer, tasks, torch.device("cpu"), 4, 6, str(ZEROSHOT), progress=False,
                                  bootstrap_iters=1000))  # (lambada's perplexity stderr; 100k by default)
    direct = direct_results(model, tokenizer, tasks, str(ZEROSHOT), 6, 4, "cpu", str(tmp_path / "cache"),
                            task_manager(), bootstrap_iters=1000)
    assert ours == direct
    assert set(ours) == set(tasks) and "acc_norm,none" in ours["piqa"] and "perplexity,none" in ours["lambada_openai"]


def test_missing_task_file_names_the_expected_path(capsys, tmp_path, stories_path):
    write_jsonl(tmp_path / "piqa" / "validation.jsonl", PIQA)
    code, _, err = run(capsys, "eval", stories_path, "--tasks", "piqa,arc_easy", "--task-data", tmp_path)
    assert code == 2
    assert f"no documents at {tmp_path / 'arc_easy' / 'test.jsonl'}" in err


def test_unknown_task(capsys, tmp_path, stories_path):
    code, _, err = run(capsys, "eval", stories_path, "--tasks", "piqa,arc_eazy", "--task-data", tmp_path)
    assert code == 2 and "unknown lm-eval task 'arc_eazy' (did you mean arc_easy" in err


def test_hub_unreachable_names_task_data(capsys, monkeypatch, stories_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)  # what lm-eval's download calls
    code, _, err = run(capsys, "eval", stories_path, "--tasks", "piqa")
    assert code == 2
    assert "could not load 'baber/piqa' from the Hugging Face hub (ConnectionError" in err
    assert "pass --task-data DIR with the documents in DIR/piqa/validation.jsonl" in err


def test_prune_reports_zeroshot_and_report_prints_it(capsys, tmp_path, stories_path, tinystories_path):
    write_jsonl(tmp_path / "data" / "piqa" / "validation.jsonl", PIQA)
    out = tmp_path / "out"
    prune = ["prune", stories_path, "--method", "magnitude", "--sparsity", 0.5, "--calib", tinystories_path,
             "--nsamples", 2, "--seqlen", 32, "--out", out, "--device", "cpu", "--no-progress"]
    code, _, err = run(capsys, *prune, "--eval-tasks", "piqa", "--task-data", tmp_path / "data", "--limit", 3)
    assert code == 0, err
    zeroshot = json.loads((out / "lmprune_report.json").read_text())["zeroshot"]
    piqa = zeroshot["tasks"]["piqa"]
    assert piqa["n"] == 3 and zeroshot["limit"] == 3 and zeroshot["num_fewshot"] == 0
    assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} <= set(piqa)
    assert piqa["acc,none"] in (0, 1 / 3, 2 / 3, 1) and zeroshot["mean"]["acc,none"] == piqa["acc,none"]
    code, text, _ = run(capsys, "report", out)
    assert code == 0 and "first 3 documents per task" in text
    assert f"{piqa['acc,none']:.4f} ± {piqa['acc_stderr,none']:.4f}" in text


def test_bad_task_input_writes_nothing(capsys, tmp_path, stories_path, tinystories_path):
    out = tmp_path / "out"
    prune = ["prune", stories_path, "--method", "magnitude", "--sparsity", 0.5, "--calib", tinystories_path,
             "--out", out, "--no-progress"]
    code, _, err = run(capsys, *prune, "--eval-tasks", "piqa", "--task-data", tmp_path / "none")
    assert code == 2 and "--task-data" in err and "no such directory" in err and not out.exists()
    code, _, err = run(capsys, *prune, "--task-data", tmp_path)
    assert code == 2 and "--task-data needs --eval-tasks" in err


def test_batch_size_auto_is_for_tasks(capsys, stories_path, tinystories_path):
    code, _, err = run(capsys, "eval", stories_path, "--data", tinystories_path, "--batch-size", "auto")
    assert code == 2 and "--batch-size auto applies to --tasks" in err


def test_summary_means_leaf_tasks_and_table():
    from lmprune.report import format_zeroshot
    from lmprune.zeroshot import summarize

    results = {
        "results": {
            "grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": "N/A"},
            "a": {"alias": " - a", "acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.75},
            "b": {"alias": " - b", "acc,none": 0.75, "acc_stderr,none": 0.1, "perplexity,none": 12.5},
        },
        "group_subtasks": {"grp": ["a", "b"], "a": [], "b": []},
        "n-samples": {"a": {"original": 100, "effective": 10}, "b": {"original": 50, "effective": 10}},
    }
    summary = summarize(results, 10, "DIR", 8)
    assert summary["mean"] == {"acc,none": 0.5, "acc_norm,none": 0.75}  # the group row is not counted twice
    assert summary["tasks"]["a"] == {"acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.75, "n": 10}
    assert summary["tasks"]["grp"] == {"acc,none": 0.5}  # "N/A" stderr and the alias dropped
    table = format_zeroshot(summary).splitlines()
    assert "first 10 documents per task, documents from DIR" in table[0]
    assert table[3].split() == ["a", "10", "0.2500", "±", "0.1000", "0.7500"]
    assert table[4].split()[-2:] == ["perplexity", "12.5"]
    assert table[-1] == "mean: acc over 2 tasks, acc_norm over 1 task"


COPA = [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
         "choice2": "Water flowed from the spout.", "question": "effect", "idx": i, "label": 1} for i in range(4)]
HELLASWAG = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man stands in a kitchen.", "ctx_b": "he",
              "ctx": "A man stands in a kitchen. he", "endings": ["cooks.", "flies.", "sings.", "sleeps."],
              "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"} for i in range(3)]


def without(records, index, field):
    records = [dict(r) for r in records]
    del records[index][field]
    return records


def with_value(records, index, field, value):
    records = [dict(r) for r in records]
    records[index][field] = value
    return records


# (task, its file, records, the message after "FILE:LINE: "); lines count from 1
BAD_RECORDS = {
    # copa's prompt is Python (utils.doc_to_text): a KeyError inside it
    "copa lacks premise": ("copa", "validation", without(COPA, 2, "premise"), 3,
                           "lm-eval task 'copa' reads field 'premise', which this record lacks"),
    "copa's first lacks premise": ("copa", "validation", without(COPA, 0, "premise"), 1,
                                   "lm-eval task 'copa' reads field 'premise', which this record lacks"),
    "copa, none has premise": ("copa", "validation", [without(COPA, i, "premise")[i] for i in range(4)], 1,
                               "lm-eval task 'copa' reads field 'premise', which this record lacks"),
    "copa null premise": ("copa", "validation", with_value(COPA, 1, "premise", None), 2,
                          "lm-eval task 'copa' cannot read this record "
                          "(AttributeError: 'NoneType' object has no attribute 'strip')"),
    # piqa's prompt is Jinja: a missing field would otherwise render as "None"
    "piqa lacks goal": ("piqa", "validation", without(PIQA, 3, "goal"), 4,
                        "lm-eval task 'piqa' reads field 'goal', which this record lacks"),
    "piqa lacks label": ("piqa", "validation", without(PIQA, 1, "label"), 2,
                         "lm-eval task 'piqa' reads field 'label', which this record lacks"),
    "arc choices not an object": ("arc_easy", "test", [with_value(ARC, i, "choices", "abc")[i] for i in range(3)], 1,
                                  "lm-eval task 'arc_easy' cannot read this record "
                                  "(UndefinedError: 'str object' has no attribute 'label')"),
    # hellaswag has process_docs, which reads the fields before any prompt does
    "hellaswag lacks ctx_a": ("hellaswag", "validation", without(HELLASWAG, 1, "ctx_a"), 2,
                              "lm-eval task 'hellaswag' reads field 'ctx_a', which this record lacks"),
    # a field of another JSON type than in the lines before: Arrow cannot hold both in one column
    "piqa goal a number": ("piqa", "validation", with_value(PIQA, 2, "goal", 5), 3,
                           "field 'goal' has another type than in the lines before it "
                           "(ArrowTypeError: Expected bytes, got a 'int' object)"),
    "arc choices a list": ("arc_easy", "test", with_value(ARC, 1, "choices", ["moo"]), 2,
                           "field 'choices' has another type than in the lines before it "
                           "(ArrowInvalid: cannot mix list and non-list, non-null values)"),
    "copa empty record": ("copa", "validation", COPA[:1] + [{}], 2,  # copa's prompt reads 'question' first
                          "lm-eval task 'copa' reads field 'question', which this record lacks"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_record_lacking_what_its_task_reads_is_named_by_file_and_line(capsys, tmp_path, stories_path, case):
    task, split, records, line, message = BAD_RECORDS[case]
    path = tmp_path / "data" / task / f"{split}.jsonl"
    write_jsonl(path, records)
    before, model = snapshot(tmp_path), snapshot(stories_path)
    code, out, err = run(capsys, "eval", stories_path, "--tasks", task, "--task-data", tmp_path / "data",
                         "--device", "cpu", "--no-progress")
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"lmprune: error: {path}:{line}: {message}"]
    assert snapshot(tmp_path) == before and snapshot(stories_path) == model


@pytest.mark.parametrize("text, line, message", [
    ('{"goal": broken\n', 3, "not valid JSON (Expecting value at column 10)"),
    ('[1, 2]\n', 3, "expected a JSON object, not an array"),
])
def test_a_broken_task_data_line_is_named_by_its_number(capsys, tmp_path, stories_path, tinystories_path, text,
                                                        line, message):
    path = tmp_path / "data" / "piqa" / "validation.jsonl"
    write_jsonl(path, PIQA[:2])
    with open(path, "a") as f:
        f.write(text)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    # prune's check up front, before the model is loaded or pruned
    code, _, err = run(capsys, "prune", stories_path, "--method", "magnitude", "--sparsity", 0.5, "--calib",
                       tinystories_path, "--out", out, "--no-progress", "--eval-tasks", "piqa",
                       "--task-data", tmp_path / "data")
    assert code == 2
    assert [l for l in err.splitlines() if not l.startswith("lmprune: plan:")] == \
           [f"lmprune: error: {path}:{line}: {message}"]
    assert snapshot(tmp_path) == before


def test_prune_checks_every_record_up_front(capsys, tmp_path, stories_path, tinystories_path):
    path = tmp_path / "data" / "copa" / "validation.jsonl"
    write_jsonl(path, without(COPA, 2, "premise"))
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "prune", stories_path, "--method", "magnitude", "--sparsity", 0.5, "--calib",
                       tinystories_path, "--out", tmp_path / "out", "--no-progress", "--eval-tasks", "copa",
                       "--task-data", tmp_path / "data")
    assert code == 2
    assert err.splitlines() == [f"lmprune: error: {path}:3: lm-eval task 'copa' reads field 'premise', "
                                "which this record lacks"]  # before the plan line: nothing was loaded
    assert snapshot(tmp_path) == before


def test_every_record_of_the_shared_sets_passes_the_check(tmp_path):
    require_shared(ZEROSHOT)
    from lmprune.zeroshot import build_tasks

    tasks = build_tasks(["piqa", "arc_easy", "copa", "sglue_rte", "openbookqa"], str(ZEROSHOT))
    assert set(tasks.values()) and all(len(t.eval_docs) > 0 for t in tasks.values())


def test_no_git_message_outside_a_repository(capfd, monkeypatch, tmp_path, stories_path):
    # lm-eval runs `git describe` in the working directory; git writes to the process's stderr itself
    write_jsonl(tmp_path / "data" / "piqa" / "validation.jsonl", PIQA[:2])
    monkeypatch.chdir(tmp_path)  # not inside a repository: /tmp
    code = main([str(a) for a in ("eval", stories_path, "--tasks", "piqa", "--task-data", tmp_path / "data",
                                  "--device", "cpu", "--no-progress")])
    err = capfd.readouterr().err
    assert code == 0, err
    assert "fatal" not in err and "git" not in err, err
