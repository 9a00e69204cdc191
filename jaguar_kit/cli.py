"""``jaguar-kit``: one command, a sub-command per stage.

Arguments are mapped onto the :class:`~jaguar_kit.config.Config` once, here; the stages
themselves take a config and paths. Every stage takes ``--config FILE`` and any number of
``--set section.key=value`` overrides. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import Config, apply_overrides, load_config
from .errors import JaguarKitError


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config) if getattr(args, "config", None) else Config()
    return apply_overrides(cfg, getattr(args, "set", None))


def _add_common(p: argparse.ArgumentParser, data: bool = True, out: bool = True) -> None:
    p.add_argument("--config", help="a JSON or YAML config file (partial files fill in defaults)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    if data:
        p.add_argument("--data", required=True, help="a competition-shaped folder (train.csv, test.csv, images)")
    if out:
        p.add_argument("--out", required=True, help="the output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_synth(args: argparse.Namespace) -> None:
    from .data.synth import generate_competition

    out = generate_competition(args.out, identities=args.identities, images_per_identity=args.images_per_identity,
                               test_per_identity=args.test_per_identity, size=args.size, seed=args.seed,
                               workers=args.workers, progress=not args.quiet)
    print(f"synthetic competition folder: {out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from .data.competition import load_competition
    from .data.prepare import prepare_images

    cfg, comp = _config(args), load_competition(args.data)
    paths = list(comp.train["path"]) + list(comp.test_images["path"])
    d = cfg.data
    done = prepare_images(paths, args.out, d.alpha_mode, d.crop_margin, d.prepared_size, workers=d.workers,
                          progress=not args.quiet)
    print(f"{done.summary()} in {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    import signal
    import tempfile

    from .train.engine import _dist_info, launch_ddp, train, train_folds

    cfg = _config(args)
    if args.gpus > 1:  # every rank reads the settings from one file; the run folder is rank 0's to write
        with tempfile.TemporaryDirectory() as tmp:
            cfg.save(Path(tmp) / "config.json")
            sys.exit(launch_ddp(Path(tmp) / "config.json", args.data, args.out, nproc=args.gpus))
    if args.all_folds:
        results = train_folds(cfg, args.data, args.out, progress=not args.quiet)
    else:
        results = [train(cfg, args.data, args.out, prepared_root=args.prepared, progress=not args.quiet)]
    if _dist_info()[0] != 0:
        return  # under DDP only rank 0 reports
    for r in results:
        print(r.summary())
    stopped = [r.stop_reason for r in results if r.stop_reason.startswith("SIG")]
    if stopped:  # so `train && embed` does not go on with an unfinished model
        sys.exit(128 + signal.Signals[stopped[0]].value)


def cmd_config(args: argparse.Namespace) -> None:
    from .config import describe_config

    print(describe_config(_config(args)))


def cmd_embed(args: argparse.Namespace) -> None:
    from .kaggle.env import default_cache_dir, is_kaggle
    from .pipeline import embed_split

    cfg = _config(args)
    out = Path(args.out)
    cache = Path(cfg.embed.cache_dir or (default_cache_dir() if is_kaggle() else out / "cache"))
    prepared = Path(args.prepared or out / "prepared")
    for split in args.split:
        emb = embed_split(args.checkpoint, args.data, split, cache, prepared, cfg, device=cfg.train.device,
                          progress=not args.quiet)
        path = emb.save(out / f"embeddings_{split}.npz")
        print(f"{len(emb.names)} {split} embeddings -> {path}")


def cmd_score(args: argparse.Namespace) -> None:
    from .pipeline import Embeddings, read_labels, score

    cfg = _config(args)
    result = score([Embeddings.load(p) for p in args.embeddings], read_labels(args.labels), cfg.retrieval)
    for tag, r in result.items():
        print(f"{tag:9s} identity-balanced mAP {r['map']:.4f}  rank-1 {r['rank1']:.4f}")
    if args.per_identity:
        print(result["reranked" if cfg.retrieval.rerank else "raw"]["per_identity"].to_string(index=False))


def cmd_submit(args: argparse.Namespace) -> None:
    from .pipeline import Embeddings, submit

    cfg = _config(args)
    out = Path(args.out)
    path = submit([Embeddings.load(p) for p in args.embeddings], args.data, out / "submission.csv", cfg.retrieval,
                  grid_png=out / "retrieval_grid.png")
    print(f"wrote {path}\nsubmit with: kaggle competitions submit -c jaguar-re-id -f {path} -m \"jaguar_kit\"")


def cmd_tune(args: argparse.Namespace) -> None:
    from .pipeline import Embeddings, read_labels
    from .tune import TTA_ORDER, summary, tune, write_outputs

    cfg = _config(args)
    variants: dict[str, list] = {}
    for item in args.embeddings:  # [TTA=]PATH; items of one TTA setting are the models of an ensemble
        tta, sep, path = item.partition("=")
        if not sep or tta not in TTA_ORDER:
            tta, path = cfg.embed.tta, item
        variants.setdefault(tta, []).append(Embeddings.load(path))
    paths = None
    if args.data:
        from .data.competition import load_competition

        comp = load_competition(args.data, check_images=False)
        paths = dict(zip(comp.train["filename"].astype(str), comp.train["path"]))
    labels = args.labels or (Path(args.data) / "train.csv" if args.data else None)
    if labels is None:
        raise JaguarKitError("tune: give --labels (a filename,ground_truth CSV) or --data")
    out = Path(args.out)
    result = tune(variants, read_labels(labels), cfg.retrieval, image_paths=paths,
                  local_cache=Path(args.local_cache) if args.local_cache else out / "local_cache",
                  base_tta=cfg.embed.tta, seed=args.seed, workers=cfg.data.workers, progress=not args.quiet)
    files = write_outputs(result, out)
    print(summary(result))
    print(f"wrote {files['config']}, {files['table'].name}, {files['report'].name}\n"
          f"submit with it: jaguar-kit submit --config {files['config']} --data DATA --out OUT --embeddings TEST.npz")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(data=args.data, out=args.out, overrides=args.set, progress=not args.quiet, minutes=args.minutes)


def cmd_kaggle_push(args: argparse.Namespace) -> None:
    from .kaggle.push import push_kernel

    push_kernel(args.kernel, user=args.user, build_dir=Path(args.build), dry_run=args.dry_run, resume=args.resume)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="jaguar-kit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"jaguar_kit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate a synthetic competition folder (the built-in default data)")
    p.add_argument("--out", required=True)
    p.add_argument("--identities", type=int, default=30)
    p.add_argument("--images-per-identity", type=int, default=10)
    p.add_argument("--test-per-identity", type=int, default=3)
    p.add_argument("--size", type=int, default=256, help="longest image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="decode every image once into the prepared-image cache (resumable)")
    _add_common(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train (or resume) a re-ID model; --out is the run folder")
    _add_common(p)
    p.add_argument("--prepared", help="prepared-image cache folder (default: next to the run folder)")
    p.add_argument("--all-folds", action="store_true", help="cross-validation: every fold into OUT/fold{k}")
    p.add_argument("--gpus", type=int, default=1, help="processes for DDP via torchrun (2 on Kaggle's T4 x2)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print every config key with its value and what it does")
    p.add_argument("--config", help="a JSON or YAML config file to show (default: the built-in defaults)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config value")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("embed", help="embed images with TTA in resumable 100-image chunks")
    _add_common(p)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint, or frozen:BACKBONE for a frozen baseline")
    p.add_argument("--split", nargs="+", default=["test"], choices=["train", "val", "test"])
    p.add_argument("--prepared", help="prepared-image cache folder (default: OUT/prepared)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("score", help="identity-balanced mAP and rank-1 of embeddings against labels")
    _add_common(p, data=False, out=False)
    p.add_argument("--embeddings", nargs="+", required=True, help="one or more embeddings .npz (several: an ensemble)")
    p.add_argument("--labels", required=True, help="a filename,ground_truth CSV (train.csv, solution.csv)")
    p.add_argument("--per-identity", action="store_true")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("submit", help="write submission.csv from test embeddings (QE, re-ranking, ensembles)")
    _add_common(p)
    p.add_argument("--embeddings", nargs="+", required=True, help="test embeddings .npz, one per model")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("tune", help="choose TTA, QE, re-ranking and the local fusion on validation; writes tuned.json")
    _add_common(p, data=False)
    p.add_argument("--embeddings", nargs="+", required=True, metavar="[TTA=]NPZ",
                   help="validation embeddings, one per model; prefix none=, hflip= or flip4= to compare TTA settings "
                        "(unprefixed: embed.tta)")
    p.add_argument("--labels", help="filename,ground_truth CSV (default: DATA/train.csv)")
    p.add_argument("--data", help="the competition folder: turns on local-feature verification on its train images")
    p.add_argument("--local-cache", help="local-feature cache folder (default: OUT/local_cache)")
    p.add_argument("--seed", type=int, default=0, help="which identities form each half of the held-out check")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="the whole pipeline on a CPU on synthetic data (or --data), with a report")
    p.add_argument("--data", help="a competition-shaped folder (default: generate the synthetic one)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget for the fine-tuning step")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    kp = sub.add_parser("kaggle", help="Kaggle delivery: push kernels")
    ksub = kp.add_subparsers(dest="kaggle_command", required=True, metavar="ACTION")
    p = ksub.add_parser("push", help="convert a kernel to a notebook, validate its metadata, kaggle kernels push")
    p.add_argument("kernel", help="train, infer, submit, or a folder with kernel-metadata.json")
    p.add_argument("--user", help="Kaggle user name (default: KAGGLE_USERNAME)")
    p.add_argument("--build", default="build/kaggle", help="build folder")
    p.add_argument("--resume", action="store_true",
                   help="also attach this kernel's own previous output (to resume a timed-out session)")
    p.add_argument("--dry-run", action="store_true", help="stop before the network; print the command")
    p.set_defaults(func=cmd_kaggle_push)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except JaguarKitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
