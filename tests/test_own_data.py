"""One's own data, end to end with the command lines only, as the README's "Own data" section gives
them: raw folders (photos, scribbles, ground truth, a classes file) -> `data prepare` -> both phases
of the run script (its image-size preset chosen from the images) -> the tests with class names ->
`infer` on new images of other sizes (40x40 and 500x300), label maps at the input's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from rloss.data.synthetic import make_sample

REPO = Path(__file__).resolve().parents[1]
CLASSES = "0 background\n1 red_thing\n2 green_thing\n"


def write_raw_folders(root: Path, count: int = 10, size: int = 48) -> None:
    """photos/*.jpg, scribbles/*.png, masks/*.png and classes.txt, as a user has them."""
    rng = np.random.default_rng(5)
    for folder in ("photos", "scribbles", "masks"):
        (root / folder).mkdir(parents=True)
    for index in range(count):
        image, truth, scribbles = make_sample(rng, size, size, 3)
        Image.fromarray(image).save(root / "photos" / f"img{index:02d}.jpg", quality=95)
        Image.fromarray(scribbles).save(root / "scribbles" / f"img{index:02d}.png")
        Image.fromarray(truth).save(root / "masks" / f"img{index:02d}.png")
    (root / "classes.txt").write_text(CLASSES)


def command(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert done.returncode == 0, " ".join(args) + "\n" + done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_raw_folders_to_segmented_new_images(tmp_path):
    write_raw_folders(tmp_path / "raw")
    raw = tmp_path / "raw"
    data = tmp_path / "mydata"
    command(sys.executable, "-m", "rloss", "data", "prepare", f"--images={raw / 'photos'}",
            f"--scribbles={raw / 'scribbles'}", f"--ground-truth={raw / 'masks'}", f"--classes={raw / 'classes.txt'}",
            "--val=0.3", f"--out={data}")
    assert len((data / "list" / "train.txt").read_text().splitlines()) == 7
    assert len((data / "list" / "val.txt").read_text().splitlines()) == 3
    command(sys.executable, "-m", "rloss", "data", "check", str(data))

    model_dir, log_dir = tmp_path / "model", tmp_path / "log"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), DATA_ROOT=str(data), MODEL_DIR=str(model_dir),
               LOG_DIR=str(log_dir), MAX_ITER="3", STEPSIZE="2", MAX_ITER2="2", STEPSIZE2="1", BATCH_SIZE="4")
    done = command("sh", str(REPO / "exper" / "run_pascal_scribble.sh"), env=env)
    assert "PRESET=40" in done.stdout and "DENSECRF_SCALE=0.25" in done.stdout  # chosen from the 48x48 images
    weights = model_dir / "trainwithdensecrfloss_iter_2.caffemodel"
    assert (model_dir / "train_iter_3.caffemodel").is_file() and weights.is_file()
    metrics = json.loads((log_dir / "metrics_densecrf.json").read_text())
    assert metrics["class_names"] == ["background", "red_thing", "green_thing"]
    assert set(metrics["class_iou_by_name"]) == {"background", "red_thing", "green_thing"}

    new = tmp_path / "new"
    new.mkdir()
    rng = np.random.default_rng(9)
    for name, (height, width) in {"small": (40, 40), "wide": (300, 500)}.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(new / f"{name}.jpg")
    out = tmp_path / "segmented"
    command(sys.executable, "-m", "rloss", "infer", f"--model={REPO / 'prototxt' / 'small_fcn' / 'test.prototxt'}",
            f"--weights={weights}", f"--images={new}", f"--output_dir={out}", f"--classes={data / 'classes.txt'}")
    for name, size in {"small": (40, 40), "wide": (500, 300)}.items():
        label_map = sorted(out.glob(f"{name}*.png"))[0]
        with Image.open(label_map) as written:
            assert written.size == size
            assert set(np.unique(np.asarray(written))) <= {0, 1, 2}
