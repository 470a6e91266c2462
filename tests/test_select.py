"""``aligntk select``: scores checked by hand against the model's logits, the keep rules, the output folder, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from aligntk.cli import main
from aligntk.testing import char_tokenizer, run_recipe, tiny_classifier, tiny_model, write_tiny_assets
from aligntk_select.selection import choose, quantiles


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny addition data (12 rows); a tiny model trained 4 steps (strong), one untrained (weak), a reward model."""
    folder = tmp_path_factory.mktemp("select")
    recipe = write_tiny_assets(folder, rows=12)
    recipe["output_dir"] = str(folder / "strong")
    run_recipe(recipe, ["train.max_steps=4", "train.batch_size=4", "data.eval_path=null"])
    tok = char_tokenizer("0123456789+=")
    weak = tiny_model(tok, seed=1)
    weak.save_pretrained(folder / "weak")
    tok.save_pretrained(folder / "weak")
    models = {"strong": folder / "strong" / "model", "weak": folder / "weak"}
    reward = folder / "reward"
    rm = tiny_classifier(tok, num_labels=1, seed=3)
    rm.save_pretrained(reward)
    tok.save_pretrained(reward)
    return {"data": folder / "train.jsonl", "folder": folder, "reward": reward, **models}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _hand_nll(model_dir: Path, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Mean NLL of the completion tokens from the model's full logits on one unpadded row."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    p = len(prompt_ids)
    return -sum(logp[p - 1 + j, t].item() for j, t in enumerate(completion_ids)) / len(completion_ids)


def _select(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["select", *map(str, args)])
    return result.exit_code, result.output


def test_perplexity_and_ifd_equal_a_hand_computation(assets: dict[str, Path], tmp_path: Path) -> None:
    model = assets["strong"]
    for score in ("perplexity", "ifd"):
        code, out = _select("--data", assets["data"], "--model", model, "--score", score, "--keep-top", 3,
                            "--batch-size", 5, "--out", tmp_path / score)  # fmt: skip
        assert code == 0, out
    tok = AutoTokenizer.from_pretrained(model)
    rows = _rows(assets["data"])
    ppl = _rows(tmp_path / "perplexity" / "scores.jsonl")
    ifd = _rows(tmp_path / "ifd" / "scores.jsonl")
    start = tok("", add_special_tokens=True)["input_ids"] or [tok.bos_token_id]
    for i in (0, 5, 11):  # rows in different batches
        prompt = tok(rows[i]["prompt"], add_special_tokens=True)["input_ids"]
        completion = tok(rows[i]["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        given = _hand_nll(model, prompt, completion)
        alone = _hand_nll(model, start, completion)
        assert ppl[i]["score"] == pytest.approx(math.exp(given), rel=1e-4)
        assert ifd[i]["score"] == pytest.approx(math.exp(given) / math.exp(alone), rel=1e-4)
        assert ifd[i]["nll_alone"] == pytest.approx(alone, rel=1e-4)


def test_learnability_is_weak_loss_minus_strong_loss(assets: dict[str, Path], tmp_path: Path) -> None:
    code, out = _select("--data", assets["data"], "--weak", assets["weak"], "--strong", assets["strong"],
                        "--score", "learnability", "--keep-fraction", 0.5, "--out", tmp_path / "l")  # fmt: skip
    assert code == 0, out
    for name in ("weak", "strong"):
        code, out = _select("--data", assets["data"], "--model", assets[name], "--score", "perplexity",
                            "--keep-top", 1, "--out", tmp_path / name)  # fmt: skip
        assert code == 0, out
    learn = _rows(tmp_path / "l" / "scores.jsonl")
    weak, strong = (_rows(tmp_path / n / "scores.jsonl") for n in ("weak", "strong"))
    for row, w, s in zip(learn, weak, strong):
        assert row["score"] == pytest.approx(math.log(w["score"]) - math.log(s["score"]), abs=1e-5)
        assert row["score"] == pytest.approx(row["weak_nll"] - row["strong_nll"], abs=1e-6)
    assert sum(r["kept"] for r in learn) == 6


def test_reward_is_the_scalar_head_batched_or_not(assets: dict[str, Path], tmp_path: Path) -> None:
    for bs in (1, 7):
        code, out = _select("--data", assets["data"], "--model", assets["reward"], "--score", "reward",
                            "--threshold", 0.0, "--batch-size", bs, "--out", tmp_path / f"r{bs}")  # fmt: skip
        assert code == 0, out
    one, many = (_rows(tmp_path / f"r{bs}" / "scores.jsonl") for bs in (1, 7))
    assert [r["score"] for r in one] == pytest.approx([r["score"] for r in many], abs=1e-5)
    assert all(r["kept"] == (r["score"] >= 0.0) for r in many)


def test_keep_rules_keep_the_right_rows_in_file_order() -> None:
    scores = [0.5, 3.0, 1.0, 3.0, -2.0, float("nan")]
    assert choose(scores, keep_top=2).kept == [False, True, False, True, False, False]
    top3 = choose(scores, keep_top=3)
    assert top3.kept == [False, True, True, True, False, False] and top3.cut == 1.0
    assert choose(scores, keep_top=1).kept == [False, True, False, False, False, False]  # tie: the earlier row
    assert choose(scores, keep_top=2, lowest=True).kept == [True, False, False, False, True, False]
    assert choose(scores, keep_fraction=0.5).kept == [False, True, True, True, False, False]
    assert choose(scores, threshold=1.0).kept == [False, True, True, True, False, False]
    assert choose(scores, threshold=0.5, lowest=True).kept == [True, False, False, False, True, False]
    assert sum(choose(scores, keep_top=100).kept) == 5  # never the NaN
    assert quantiles([3.0, 1.0, 2.0, 4.0])["p50"] == 2.5


def test_output_folder_is_complete_and_well_formed(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sel"
    code, text = _select("--data", assets["data"], "--model", assets["strong"], "--score", "perplexity",
                         "--keep-top", 4, "--lowest", "--out", out)  # fmt: skip
    assert code == 0, text and "kept 4 of 12 rows" in text
    assert sorted(p.name for p in out.iterdir()) == ["histogram.png", "kept.jsonl", "report.json", "report.md", "scores.jsonl"]
    rows, scores = _rows(assets["data"]), _rows(out / "scores.jsonl")
    assert [s["row"] for s in scores] == list(range(12)) and scores[0]["where"].endswith("train.jsonl:1")
    assert _rows(out / "kept.jsonl") == [r for r, s in zip(rows, scores) if s["kept"]]  # as read, file order
    kept_scores = sorted(s["score"] for s in scores if s["kept"])
    assert kept_scores == sorted(s["score"] for s in scores)[:4]
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == 12 and report["kept"] == 4 and report["cut"] == pytest.approx(kept_scores[-1])
    assert set(report["quantiles"]) >= {"p0", "p50", "p100"} and report["histogram"] == "histogram.png"
    assert "kept: 4 of 12 rows" in (out / "report.md").read_text()
    assert (out / "histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_chat_rows_score_the_assistant_reply(assets: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}) + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "4+4="}], "completion": "8"}) + "\n"
    )  # fmt: skip
    code, out = _select("--data", data, "--model", assets["strong"], "--score", "ifd", "--keep-top", 1,
                        "--out", tmp_path / "o")  # fmt: skip
    assert code == 0, out
    assert all(math.isfinite(r["score"]) and r["score"] > 0 for r in _rows(tmp_path / "o" / "scores.jsonl"))


@pytest.mark.parametrize(
    "args, line",
    [
        (["--score", "ifd", "--keep-top", "1"], "error: select: data: required key is missing; out: required key is missing"),
        (["--keep-top", "1", "--threshold", "2"], "give exactly one of keep_top, keep_fraction, threshold (got keep_top, threshold)"),
        (["--keep-top", "0"], "keep_top: Input should be greater than or equal to 1, got 0"),
        (["--score", "learnability", "--keep-top", "1"], "score learnability needs weak and strong"),
        (["--keep-top", "1", "--model", "nowhere"], "error: nowhere: model folder not found"),
        (["--keep-top", "1", "--data", "{bad}"], ":2: expected 'prompt' and 'completion'"),
        (["--keep-top", "1", "--out", "{exists}"], "the output folder exists"),
    ],
)
def test_cli_errors_are_one_line(assets: dict[str, Path], tmp_path: Path, args: list[str], line: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"question": "x"}\n')
    (tmp_path / "exists").mkdir()
    base = {"--data": str(assets["data"]), "--model": str(assets["strong"]), "--score": "perplexity", "--out": str(tmp_path / "o")}
    if "--score" in args and args[0] == "--score" and args[1] == "ifd":
        base = {}
    given = [a.replace("{bad}", str(bad)).replace("{exists}", str(tmp_path / "exists")) for a in args]
    flags = dict(base)
    for key, value in zip(given[::2], given[1::2]):
        flags[key] = value
    code, out = _select(*[x for kv in flags.items() for x in kv])
    assert code != 0 and len(out.strip().splitlines()) == 1 and line in out, out
    assert not (tmp_path / "o").exists()


def test_yaml_spec_paths_are_relative_to_it_and_unknown_keys_are_errors(assets: dict[str, Path], tmp_path: Path) -> None:
    spec = tmp_path / "select.yaml"
    spec.write_text(f"data: {assets['data']}\nmodel: {assets['strong']}\nscore: perplexity\nkeep_top: 2\nout: sel\n")
    code, out = _select(spec)
    assert code == 0, out
    assert len(_rows(tmp_path / "sel" / "kept.jsonl")) == 2
    spec.write_text("data: x.jsonl\nscore: perplexity\nkeep_topp: 2\n")
    code, out = _select(spec, "--out", tmp_path / "o2")
    assert code == 1 and "keep_topp: unknown key, did you mean 'keep_top'?" in out and len(out.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------
# Classification rows: confidence, label loss, learnability between two classifiers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny random BERT classifiers (3 classes, different seeds) and text rows with hard, soft and CSV-style labels."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("select_cls")
    tok = char_tokenizer("abcdefgh ")
    out: dict[str, Path] = {}
    for name, seed in (("weak", 0), ("strong", 1)):
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=32, num_labels=3,
                            pad_token_id=tok.pad_token_id)  # fmt: skip
        BertForSequenceClassification(config).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        out[name] = folder / name
    rows = [{"text": "ab", "label": 2}, {"text": "hgfed cba", "label": [0.25, 0.7, 0.05]}, {"text": "c", "label": "0"},
            {"text": "bad cafe", "label": [0.0, 0.0, 1.0]}, {"text": "ggg", "label": 1}]  # fmt: skip
    out["data"] = folder / "rows.jsonl"
    out["data"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _hand_probs(model_dir: Path, text: str) -> torch.Tensor:
    """softmax of the classifier's logits on one unpadded text, ``[C]``."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float().softmax(-1)


def _target(label: object) -> list[float]:
    return label if isinstance(label, list) else [float(c == int(label)) for c in range(3)]  # type: ignore[arg-type]


def test_confidence_and_label_loss_equal_softmax_by_hand(classifiers: dict[str, Path], tmp_path: Path) -> None:
    model, rows = classifiers["weak"], _rows(classifiers["data"])
    for score in ("confidence", "loss"):
        for bs in (1, 2):  # padded batches give the unpadded values
            code, out = _select("--data", classifiers["data"], "--model", model, "--score", score, "--keep-top", 2,
                                "--batch-size", bs, "--out", tmp_path / f"{score}{bs}")  # fmt: skip
            assert code == 0, out
    for i, row in enumerate(rows):
        p = _hand_probs(model, row["text"])
        y = torch.tensor(_target(row["label"]))
        loss = -(y[y > 0] * p[y > 0].log()).sum().item()
        for bs in (1, 2):
            assert _rows(tmp_path / f"confidence{bs}" / "scores.jsonl")[i]["score"] == pytest.approx(p.max().item(), abs=1e-6)
            assert _rows(tmp_path / f"loss{bs}" / "scores.jsonl")[i]["score"] == pytest.approx(loss, abs=1e-5)
    report = json.loads((tmp_path / "confidence1" / "report.json").read_text())
    assert report["task"] == "sequence_classification" and report["kept"] == 2


def test_confidence_needs_no_label_and_keeps_the_surest_rows(classifiers: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in ("ab", "hgfed", "c", "bad")))
    code, out = _select("--data", data, "--model", classifiers["strong"], "--score", "confidence", "--text-key", "sentence",
                        "--keep-fraction", 0.5, "--out", tmp_path / "o")  # fmt: skip
    assert code == 0, out
    scores = _rows(tmp_path / "o" / "scores.jsonl")
    hand = [_hand_probs(classifiers["strong"], t).max().item() for t in ("ab", "hgfed", "c", "bad")]
    assert [s["score"] for s in scores] == pytest.approx(hand, abs=1e-6)
    top2 = sorted(range(4), key=lambda i: -hand[i])[:2]
    assert [s["kept"] for s in scores] == [i in top2 for i in range(4)]


def test_classifier_learnability_is_weak_label_loss_minus_strong(classifiers: dict[str, Path], tmp_path: Path) -> None:
    code, out = _select("--data", classifiers["data"], "--weak", classifiers["weak"], "--strong", classifiers["strong"],
                        "--task", "sequence_classification", "--score", "learnability", "--keep-top", 2,
                        "--out", tmp_path / "l")  # fmt: skip
    assert code == 0, out
    for name in ("weak", "strong"):
        code, out = _select("--data", classifiers["data"], "--model", classifiers[name], "--score", "loss",
                            "--keep-top", 1, "--out", tmp_path / name)  # fmt: skip
        assert code == 0, out
    weak, strong = (_rows(tmp_path / n / "scores.jsonl") for n in ("weak", "strong"))
    for row, w, s in zip(_rows(tmp_path / "l" / "scores.jsonl"), weak, strong):
        assert row["weak_loss"] == pytest.approx(w["score"], abs=1e-6)
        assert row["strong_loss"] == pytest.approx(s["score"], abs=1e-6)
        assert row["score"] == pytest.approx(w["score"] - s["score"], abs=1e-6)


@pytest.mark.parametrize(
    "row, score, line",
    [
        ({"label": 1}, "confidence", ":2: no 'text' (the text to classify); the row has keys ['label']"),
        ({"text": 3, "label": 1}, "confidence", ":2: 'text' must be a string (the text to classify), got int"),
        ({"text": "ab"}, "loss", ":2: no 'label' (the label); the row has keys ['text']"),
        ({"text": "ab", "label": 3}, "loss", ":2: 'label' is 3, outside [0, 3) (the model has 3 classes)"),
        ({"text": "ab", "label": [0.5, 0.5]}, "loss", ":2: 'label' has 2 probabilities, the model has 3 classes"),
        ({"text": "ab", "label": [0.5, 0.6, 0.1]}, "loss", ":2: 'label' must be non-negative probabilities summing to 1"),
        ({"text": "ab", "label": "yes"}, "loss", ":2: 'label' must be an integer class or a list of 3 probabilities, got string"),
    ],
)
def test_classification_row_errors_name_the_row_and_key(
    classifiers: dict[str, Path], tmp_path: Path, row: dict, score: str, line: str
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "ab", "label": 0}) + "\n" + json.dumps(row) + "\n")
    code, out = _select("--data", data, "--model", classifiers["weak"], "--score", score, "--keep-top", 1, "--out", tmp_path / "o")
    assert code == 1 and len(out.strip().splitlines()) == 1 and line in out, out
    assert not (tmp_path / "o").exists()


def test_classifier_scores_refuse_a_causal_lm_and_a_wrong_task(
    classifiers: dict[str, Path], assets: dict[str, Path], tmp_path: Path
) -> None:
    code, out = _select("--data", classifiers["data"], "--model", assets["strong"], "--score", "confidence",
                        "--keep-top", 1, "--out", tmp_path / "o")  # fmt: skip
    assert code == 1 and "not a sequence-classification model" in out and len(out.strip().splitlines()) == 1, out
    code, out = _select("--data", classifiers["data"], "--model", classifiers["weak"], "--score", "ifd",
                        "--task", "sequence_classification", "--keep-top", 1, "--out", tmp_path / "o")  # fmt: skip
    assert code == 1 and "score ifd needs task causal_lm, got task sequence_classification" in out, out
