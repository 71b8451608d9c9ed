"""The MSRC-21 experiment's summary (called by exper/msrc21/run.sh; can be rerun on its output folder).

    python exper/msrc21/report.py --out OUT --seeds "1 2 3" [--conditions "..."] [--data_root D] [--list_dir L]

Reads OUT/log/seed<S>/metrics_<condition>_<set>.json (from `python -m rloss test --metrics_json`) and writes
OUT/results/summary.json ({condition: {seed: val mIoU in %}}), summary_train.json (the same for the training
images against their full ground truth, train_full), summary.md (mean +- std over the seeds, ratio to full
supervision) and, when matplotlib is importable, summary.png: the val mIoU bars with their standard deviation,
and a few val images with their scribbles, the pCE and +DenseCRF predictions of the first seed and the ground
truth (from OUT/predictions/<condition>/, written by the val tests of the first seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CONDITIONS = ("pce", "densecrf", "normalized_cut", "control", "full")
LABELS = {
    "pce": "partial cross-entropy (phase 1)",
    "densecrf": "+ DenseCRF loss (phase 2)",
    "normalized_cut": "+ normalized cut loss (phase 2)",
    "gated_crf": "+ Gated CRF loss (phase 2)",
    "size_constraint": "+ size constraint loss (phase 2)",
    "control": "partial cross-entropy, as long (control)",
    "full": "full supervision",
}
SHORT = {"pce": "pCE", "densecrf": "+DenseCRF", "normalized_cut": "+NC", "gated_crf": "+Gated",
         "size_constraint": "+Size", "control": "control", "full": "full"}


def miou_table(out: Path, seeds: list[str], conditions: list[str], split: str) -> dict[str, dict[str, float]]:
    """{condition: {seed: mIoU in %}} from the metrics files; a missing file is an error naming it."""
    table: dict[str, dict[str, float]] = {}
    for condition in conditions:
        table[condition] = {}
        for seed in seeds:
            path = out / "log" / f"seed{seed}" / f"metrics_{condition}_{split}.json"
            if not path.is_file():
                raise SystemExit(f"report.py: {path} is missing "
                                 f"(did the test of {condition}, seed {seed}, on {split} run?)")
            table[condition][seed] = round(100 * float(json.loads(path.read_text())["mean_iou"]), 4)
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(val: dict, train: dict, settings: str, seeds: list[str]) -> str:
    full = mean_std(list(val["full"].values()))[0] if "full" in val else None
    lines = [f"MSRC-21, msrc_fov from scratch at half size; mIoU (%) over {len(seeds)} seed(s) ({' '.join(seeds)}): "
             "mean +- std (sample std)", "",
             "| condition | val mIoU | ratio to full | training images (train_full) mIoU | per seed (val) |",
             "|---|---|---|---|---|"]
    for condition, by_seed in val.items():
        mean, std = mean_std(list(by_seed.values()))
        ratio = f"{mean / full:.3f}" if full else "-"
        on_train = "-"  # not tested on the training images (TEST_SETS without train_full)
        if train.get(condition):
            on_train = "{:.2f} +- {:.2f}".format(*mean_std(list(train[condition].values())))
        per_seed = ", ".join(f"{seed}: {value:.2f}" for seed, value in by_seed.items())
        lines.append(f"| {LABELS.get(condition, condition)} | {mean:.2f} +- {std:.2f} | {ratio} | "
                     f"{on_train} | {per_seed} |")
    paired = [f"{line} ({split})" for split, table in (("val", val), ("the training images", train))
              for line in paired_differences(table)]
    lines += [""] + paired if paired else []
    lines += ["", "Settings: " + " ".join(settings.split()), ""]
    return "\n".join(lines)


def paired_differences(table: dict) -> list[str]:
    """Each phase-2 regularizer minus the control, seed by seed (the same phase-1 model and data
    order): the difference the claim is about, with its spread over the seeds."""
    if "control" not in table:
        return []
    lines = []
    for condition, by_seed in table.items():
        if condition in ("pce", "control", "full"):
            continue
        differences = [value - table["control"][seed] for seed, value in by_seed.items()]
        mean, std = mean_std(differences)
        per_seed = ", ".join(f"{difference:+.2f}" for difference in differences)
        lines.append(f"- {LABELS.get(condition, condition)} minus the control, paired by seed: {mean:+.2f} +- "
                     f"{std:.2f} ({per_seed})")
    return lines


def label_map(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A label PNG's raw indices, resized (nearest) to size = (width, height)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            image = image.convert("L")
        return np.asarray(image.resize(size, Image.NEAREST))


def coloured(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """RGB of a label map; 255 (void, unlabelled) white."""
    rgb = palette[np.minimum(labels, 255)].copy()
    rgb[labels == 255] = 255
    return rgb


def figure(out: Path, val: dict, data_root: Path, list_dir: Path, images: int) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib is not importable; no figure")
        return None
    from rloss.palette import voc_palette

    palette = np.array(voc_palette(), dtype=np.uint8).reshape(-1, 3)
    entries = [line.split() for line in (list_dir / "val.txt").read_text().splitlines() if line.strip()]
    shown = []
    for image_rel, truth_rel in entries:
        stem = Path(image_rel).stem
        if all((out / "predictions" / c / f"{stem}.png").is_file() for c in ("pce", "densecrf")):
            shown.append((image_rel, truth_rel, stem))
        if len(shown) == images:
            break
    columns = ["image", "scribbles", "pCE", "+DenseCRF", "ground truth"] if shown else []
    rows = max(1, len(shown))
    fig = plt.figure(figsize=(4.5 + 2.2 * len(columns), max(3.5, 2.0 * rows + 0.6)))
    grid = fig.add_gridspec(rows, 1 + len(columns), width_ratios=[2.2] + [1] * len(columns))
    bars = fig.add_subplot(grid[:, 0])
    names = list(val)
    means = [mean_std(list(val[c].values()))[0] for c in names]
    stds = [mean_std(list(val[c].values()))[1] for c in names]
    bars.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c72b0")
    bars.set_xticks(range(len(names)))
    bars.set_xticklabels([SHORT.get(c, c) for c in names], rotation=30)
    bars.set_ylabel("val mIoU (%)")
    seeds = len(next(iter(val.values()))) if val else 0
    bars.set_title(f"mean +- std over {seeds} seed(s)")
    for row, (image_rel, truth_rel, stem) in enumerate(shown):
        prediction = Image.open(out / "predictions" / "pce" / f"{stem}.png")
        size = prediction.size
        scribble_rel = image_rel.replace("JPEGImages/", "scribbles/").rsplit(".", 1)[0] + ".png"
        with Image.open(data_root / image_rel) as photo:
            panels = [np.asarray(photo.convert("RGB").resize(size, Image.BILINEAR))]
        scribbles = data_root / scribble_rel
        panels.append(coloured(label_map(scribbles, size), palette) if scribbles.is_file()
                      else np.full((size[1], size[0], 3), 255, np.uint8))
        for condition in ("pce", "densecrf"):
            panels.append(coloured(label_map(out / "predictions" / condition / f"{stem}.png", size), palette))
        panels.append(coloured(label_map(data_root / truth_rel, size), palette))
        for column, panel in enumerate(panels):
            axes = fig.add_subplot(grid[row, 1 + column])
            axes.imshow(panel)
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(columns[column])
            if column == 0:
                axes.set_ylabel(stem, fontsize=8)
    fig.tight_layout()
    path = out / "results" / "summary.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run.sh's OUT folder")
    parser.add_argument("--seeds", required=True, help='e.g. "1 2 3"')
    parser.add_argument("--conditions", default=" ".join(CONDITIONS))
    parser.add_argument("--data_root", default=str(Path(__file__).resolve().parents[3] / "shared/data/msrc21"))
    parser.add_argument("--list_dir", default="", help="the lists tested (default DATA_ROOT/list)")
    parser.add_argument("--figure_images", type=int, default=4, help="val images in the figure (0: bars only)")
    parser.add_argument("--settings", default="", help="the run's settings, for summary.md")
    args = parser.parse_args(argv)
    out, seeds, conditions = Path(args.out), args.seeds.split(), args.conditions.split()
    data_root = Path(args.data_root)
    list_dir = Path(args.list_dir) if args.list_dir else data_root / "list"
    val = miou_table(out, seeds, conditions, "val")
    train_files = [out / "log" / f"seed{s}" / f"metrics_{c}_train_full.json" for s in seeds for c in conditions]
    train = miou_table(out, seeds, conditions, "train_full") if all(p.is_file() for p in train_files) else {}
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps(val, indent=2) + "\n")
    (results / "summary_train.json").write_text(json.dumps(train, indent=2) + "\n")
    (results / "summary.md").write_text(markdown(val, train, args.settings, seeds))
    path = figure(out, val, data_root, list_dir, args.figure_images)
    written = "summary_train.json, summary.md" + (f", {path.name}" if path else "")
    print(f"report.py: wrote {results / 'summary.json'}, {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
