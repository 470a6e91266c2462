"""Labelling with a frozen classifier, once per example.

The weak supervisor's probabilities are computed in one pass over the examples
(``label_examples``, which is ``aligntk.class_probabilities``) and written to a labels
file in the run folder; training runs read that file, so however many epochs the student
trains, the teacher's forward pass runs once per example. The ``accuracy`` evaluator the
protocol's runs use is the eval plugin's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aligntk import class_probabilities

#: The file the protocol writes the weak supervisor's labels into, in the weak run's folder.
LABELS_FILE = "weak_labels.jsonl"

#: ``label_examples(model, examples, collate, batch_size) -> [N, C]`` probabilities, in one pass.
label_examples = class_probabilities


def write_labels(path: Path, probs: torch.Tensor) -> Path:
    """Write ``[N, C]`` probabilities as JSON Lines ``{"index": i, "probs": [...]}`` (what ``soft_labels_path`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Renormalize after rounding so every row still sums to 1 within the reader's tolerance.
    rows = probs.double() / probs.double().sum(-1, keepdim=True)
    with path.open("w") as f:
        for i, row in enumerate(rows.tolist()):
            f.write(json.dumps({"index": i, "probs": row}) + "\n")
    return path
