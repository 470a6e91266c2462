"""Build the word-sentiment task of recipes/real/ from VADER's human-rated lexicon.

VADER (Hutto & Gilbert, 2014) rates about 7,500 English words and emoticons from -4 to +4,
each by ten human raters. This keeps plain lowercase words whose mean rating is clearly
positive or negative (|mean| >= 1.5) and whose raters agree (standard deviation <= 1.0), and
asks the model for the label in one lowercase word. The task has a checkable answer, and an
instruction-tuned 135M model does not already answer it in the asked format.

Run: pip install vadersentiment && python make_sentiment.py   (writes the .jsonl files here)
"""

from __future__ import annotations

import json
import random
from importlib.resources import files
from pathlib import Path

HERE = Path(__file__).parent
QUESTION = 'Is the word "{word}" positive or negative? Answer with one lowercase word: positive or negative.'
N_TRAIN, N_TEST = 320, 100  # per label


def words() -> dict[str, list[str]]:
    lexicon = files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    by_label: dict[str, list[str]] = {"positive": [], "negative": []}
    for line in lexicon.splitlines():
        word, mean, std, _ = line.split("\t")
        if not (word.isalpha() and word.islower() and len(word) > 2) or float(std) > 1.0:
            continue
        if abs(float(mean)) >= 1.5:
            by_label["positive" if float(mean) > 0 else "negative"].append(word)
    return by_label


def main() -> None:
    rng = random.Random(0)
    train, test = [], []
    for label, found in sorted(words().items()):
        rng.shuffle(found)
        assert len(found) >= N_TRAIN + N_TEST, (label, len(found))
        test += [(w, label) for w in found[:N_TEST]]
        train += [(w, label) for w in found[N_TEST : N_TEST + N_TRAIN]]
    rng.shuffle(train)
    rng.shuffle(test)
    other = {"positive": "negative", "negative": "positive"}

    def user(word: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": QUESTION.format(word=word)}]

    def assistant(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    files_ = {
        # SFT: TRL's conversational prompt-completion format
        "sft_train.jsonl": [{"prompt": user(w), "completion": assistant(y)} for w, y in train],
        "test.jsonl": [{"prompt": user(w), "completion": assistant(y)} for w, y in test],
        # DPO: conversational preference with an explicit prompt
        "dpo_train.jsonl": [{"prompt": user(w), "chosen": assistant(y), "rejected": assistant(other[y])} for w, y in train],
        "dpo_test.jsonl": [{"prompt": user(w), "chosen": assistant(y), "rejected": assistant(other[y])} for w, y in test],
        # GRPO: the prompt, and the reference answer the reward checks
        "rl_train.jsonl": [{"prompt": user(w), "completion": y} for w, y in train],
        "rl_test.jsonl": [{"prompt": user(w), "completion": y} for w, y in test],
    }
    for name, rows in files_.items():
        with open(HERE / name, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
