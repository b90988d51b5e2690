"""How informative are the image-wise teacher targets of the demo's checkpoints?

Trains the demo model (the demo's resolved ``training:`` section, with optional overrides) on the demo
stimulus tables, then reports per checkpoint the mean ``target_entropy / ln K`` of the teacher CLS
targets of the THINGS demo images, for the bank Sinkhorn (default centering) and the softmax with the
stored EMA center, plus the training time. Needs the demo stimulus tables:

    snakemake -c1 results/stimuli/things.parquet results/stimuli/nsd.parquet
    python bench/bench_target_entropy.py --set optim.lr=0.002 --set optim.momentum_teacher=0.95
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import pandas as pd
import torch

from brainprop.config import resolve_config, set_key
from brainprop.features import training_images
from brainprop.models import ImageWiseDinoLoss, load_checkpoint, train_dino


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", nargs="*", default=None, help="overlays over config/base.yaml (default: demo)")
    ap.add_argument("--results", default="results")
    ap.add_argument("--out", default="results/bench/target_entropy")
    ap.add_argument("--set", action="append", default=[], help="training override, e.g. optim.lr=0.002")
    ap.add_argument("--n-images", type=int, default=252, help="THINGS images evaluated")
    ap.add_argument("--bank-size", type=int, default=31, help="Sinkhorn bank images (demo: batch_size - 1)")
    ap.add_argument("--reuse", action="store_true", help="evaluate the checkpoints already in --out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = resolve_config(args.configfile)
    training = copy.deepcopy(config["training"])
    for a in args.set:
        set_key(training, a)
    model = config["models"]["dinov3_s"]
    tables = [f"{args.results}/stimuli/{d}.parquet" for d in training["datasets"]]
    roots = [f"{args.results}/demo/stimuli/{d}" for d in training["datasets"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"checkpoint_it{it}.pt" for it in training["checkpoints"]]
    start = time.perf_counter()
    if not (args.reuse and all(p.is_file() for p in paths)):
        from torch.utils.data import ConcatDataset

        from brainprop.stimuli import StimulusDataset

        data = ConcatDataset([StimulusDataset(pd.read_parquet(t), r, model["image_size"]) for t, r in zip(tables, roots)])
        train_dino(data, training, training["checkpoints"], paths, seed=config["seed"], device="cpu")
    train_s = time.perf_counter() - start
    bank = training_images(tables, roots, model["image_size"])
    things = training_images([f"{args.results}/stimuli/things.parquet"], [f"{args.results}/demo/stimuli/things"],
                             model["image_size"])
    items = [things[i] for i in range(min(args.n_images, len(things)))]
    images, ids = torch.stack([im for im, _ in items]), [i for _, i in items]
    rows = []
    for it, path in zip(training["checkpoints"], paths):
        row = {"iteration": it}
        for centering in ("sinkhorn", "softmax"):
            loss = ImageWiseDinoLoss(load_checkpoint(path, "cpu"), {"centering": centering, "n_views": 1,
                                                                     "bank_size": args.bank_size},
                                     seed=config["seed"], bank_dataset=bank)
            with torch.no_grad():
                for s in range(0, len(ids), 64):
                    loss(images[s:s + 64], ids[s:s + 64])
                    row.setdefault(centering, []).append(loss.last_target_entropy)
            row[centering] = float(torch.cat(row[centering]).mean() / loss.log_k)
        rows.append(row)
    table = pd.DataFrame(rows).rename(columns={"sinkhorn": "entropy_ratio_bank_sinkhorn",
                                               "softmax": "entropy_ratio_softmax_center"})
    print(json.dumps({"overrides": args.set, "train_seconds": round(train_s, 1), "bank_size": args.bank_size}))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
