"""Do the domains differ for the model? A nearest-centroid probe on the base's image features.

Each image's feature is the base's projected image tokens, mean-pooled (what the
LLM reads, and what CRAM's centroids and SAME's prior see with the backbone
routing encoder). Centroids come from each task's train images; every test
image is named by its nearest centroid (Euclidean). Two confusion matrices:
by domain (the manifest's ``domain`` of each task; target: >= 95% right), and
by task (tasks that share a domain should be confused with each other, not
with the rest).

    python benchmarks/domain_probe.py data/coin --backbone tiny-base-coin
    python benchmarks/domain_probe.py data/coin --path runs/coin/base --train 300
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mllm_cl.backbones import build_backbone
from mllm_cl.data.formats import read_records
from mllm_cl.data.images import ImageProcessor


def _features(model, images: ImageProcessor, paths: list[Path], batch: int = 100) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for k in range(0, len(paths), batch):
            pixels = torch.stack([images.load(p) for p in paths[k: k + batch]])
            out.append(model.image_embeddings(pixels).float())
    return torch.cat(out)


def _confusion(truth: list[int], pred: list[int], n: int) -> list[list[int]]:
    m = [[0] * n for _ in range(n)]
    for t, p in zip(truth, pred, strict=False):
        m[t][p] += 1
    return m


def _print(title: str, names: list[str], m: list[list[int]]) -> float:
    right = sum(m[i][i] for i in range(len(names)))
    total = sum(map(sum, m))
    width = max(8, max(map(len, names)) + 1)
    print(f"\n{title}: {100.0 * right / total:.1f}% named right (rows: truth, columns: nearest centroid)")
    print(" " * width + "".join(f"{n[:width - 1]:>{width}}" for n in names))
    for name, row in zip(names, m, strict=False):
        print(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    return 100.0 * right / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", help="a folder with benchmark.json whose tasks name their domain")
    p.add_argument("--backbone", default="tiny-base-coin", help="a packaged backbone or preset (default: %(default)s)")
    p.add_argument("--path", default=None, help="a saved backbone folder instead of --backbone")
    p.add_argument("--train", type=int, default=200, help="train images per task for the centroids")
    p.add_argument("--json", metavar="FILE", help="also write both matrices as JSON")
    args = p.parse_args(argv)
    root = Path(args.benchmark)
    manifest = json.loads((root / "benchmark.json").read_text())
    tasks = [t for t in manifest["tasks"] if t.get("domain") not in (None, "mixed")]
    if not tasks:
        raise SystemExit(f"{root / 'benchmark.json'}: no task names a single domain")
    backbone = build_backbone(args.backbone, path=args.path)
    model = backbone.model.eval()
    images = ImageProcessor.for_model(model)
    domains = sorted({t["domain"] for t in tasks}, key=[t["domain"] for t in tasks].index)
    names = [t["name"] for t in tasks]
    centroids, test_feats, test_task = [], [], []
    for i, t in enumerate(tasks):
        folder = root / t["image_root"]
        train = read_records(root / t["train"])[: args.train]
        centroids.append(_features(model, images, [folder / r["image"] for r in train]).mean(0))
        test = read_records(root / t["test"])
        test_feats.append(_features(model, images, [folder / r["image"] for r in test]))
        test_task += [i] * len(test)
    task_centroids = torch.stack(centroids)
    domain_of = [domains.index(t["domain"]) for t in tasks]
    domain_centroids = torch.stack([task_centroids[[j for j, d in enumerate(domain_of) if d == k]].mean(0)
                                    for k in range(len(domains))])
    feats = torch.cat(test_feats)
    nearest_task = torch.cdist(feats, task_centroids).argmin(1).tolist()
    nearest_domain = torch.cdist(feats, domain_centroids).argmin(1).tolist()
    by_domain = _confusion([domain_of[i] for i in test_task], nearest_domain, len(domains))
    by_task = _confusion(test_task, nearest_task, len(tasks))
    acc_domain = _print("domains", domains, by_domain)
    acc_task = _print("tasks", names, by_task)
    outside = sum(by_task[i][j] for i in range(len(tasks)) for j in range(len(tasks)) if domain_of[i] != domain_of[j])
    print(f"\ntest images whose nearest task centroid is of another domain: {outside} of {len(test_task)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"domains": domains, "by_domain": by_domain,
                                               "domain_accuracy": acc_domain, "tasks": names, "by_task": by_task,
                                               "task_accuracy": acc_task, "other_domain": outside}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
