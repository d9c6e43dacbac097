"""``finetune shard``: the commands that prepare data (a class folder or manifest → WebDataset shards).

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> register(parser.add_subparsers())
>>> args = parser.parse_args(["shard", "photos", "--out", "shards", "--shard-size", "500MB"])
>>> args.src, args.out, args.shard_size, args.val_fraction, args.func is cmd_shard
('photos', 'shards', '500MB', 0.2, True)
"""

from __future__ import annotations

import argparse

EPILOG_SHARD = """examples:
  finetune shard ~/photos --out ~/shards --shard-size 1GB
  finetune shard ~/photos --labels labels.csv --out ~/shards
  finetune train --data "wds:~/shards/train-{000000..000009}.tar" --val-data "wds:~/shards/val-{000000..000001}.tar"
  finetune train --data wds:~/shards --num-processes 2
the split is the seeded, stratified split a folder run makes (same --val-fraction and --seed)
"""


def cmd_shard(args: argparse.Namespace) -> int:
    from finetune.data.shards import scan_for_shards, write_shards

    columns = {k: v for k, v in (("path_column", args.path_column), ("label_column", args.label_column),
                                 ("split_column", args.split_column)) if v}
    split = scan_for_shards(args.src, labels=args.labels, val_fraction=args.val_fraction, seed=args.seed, **columns)
    index = write_shards(split, args.out, shard_size=args.shard_size, seed=args.seed)
    for warning in split.warnings:
        print(f"warning: {warning}")
    for name in ("train", "val"):
        part = index["splits"][name]
        shards = part["shards"]
        print(f"{name}: {part['count']} images in {len(shards)} shard(s) "
              f"{shards[0]['name']}..{shards[-1]['name']}" if shards else f"{name}: no images")
    if split.skipped:
        print(f"skipped {len(split.skipped)} unreadable image(s); list in {args.out}/skipped.txt")
    last = {n: index["splits"][n]["shards"][-1]["name"].split("-")[1].split(".")[0] for n in ("train", "val")}
    print(f"{len(index['classes'])} classes; index {args.out}/index.json; train with\n"
          f"  finetune train --data \"wds:{args.out}/train-{{000000..{last['train']}}}.tar\" "
          f"--val-data \"wds:{args.out}/val-{{000000..{last['val']}}}.tar\"")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``shard`` to the ``finetune`` sub-commands."""
    sh = sub.add_parser("shard", help="write a class folder or manifest as WebDataset tar shards + an index",
                        epilog=EPILOG_SHARD, formatter_class=argparse.RawDescriptionHelpFormatter)
    sh.add_argument("src", help="image folder (DIR/<class>/* or DIR/train + DIR/val), or the root of --labels paths")
    sh.add_argument("--out", required=True, help="folder for train-*.tar, val-*.tar, index.json, skipped.txt")
    sh.add_argument("--labels", default=None, help="CSV or .jsonl manifest instead of class folders")
    sh.add_argument("--path-column", default=None, help="manifest column of the image paths")
    sh.add_argument("--label-column", default=None, help="manifest column of the labels")
    sh.add_argument("--split-column", default=None, help="manifest column of the split (train/val)")
    sh.add_argument("--shard-size", default="1GB", help="bytes per shard at most, e.g. 1GB, 500MB (default: 1GB)")
    sh.add_argument("--val-fraction", type=float, default=0.2, help="validation share when SRC has no val split "
                    "(default: 0.2, as finetune train)")
    sh.add_argument("--seed", type=int, default=0, help="seed of the split and of the shard order (default: 0)")
    sh.set_defaults(func=cmd_shard)
