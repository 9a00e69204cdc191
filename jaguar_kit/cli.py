"""``jaguar-kit``: one command, a sub-command per stage.

Arguments are mapped onto the :class:`~jaguar_kit.config.Config` once, here; the stages
themselves take a config and paths. Every stage takes ``--config FILE`` and any number of
``--set section.key=value`` overrides. User errors print one line and exit with status 2. The
own-photos commands (index, identify, cluster, review) live in :mod:`jaguar_kit.photos.commands`.
"""

from __future__ import annotations

import argparse
import errno
import sys
from contextlib import nullcontext
from pathlib import Path

from .config import Config, apply_overrides, load_config
from .errors import JaguarKitError
from .photos.commands import add_photo_commands, add_photos_arguments, photos_from_args, share



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

    cfg = _config(args)
    if args.photos:  # your own labelled photos, written into the run folder as a competition-shaped folder
        from .photos.catalogue import NPZ
        from .photos.training import photos_as_competition

        is_catalogue = Path(args.photos, NPZ).is_file()
        if is_catalogue and args.detections:
            raise JaguarKitError("--detections goes with photos: a catalogue's photos already have their boxes")
        photos = args.photos if is_catalogue else photos_from_args(args, exclude=[args.out], need_identity=True)
        data = photos_as_competition(photos, args.out, workers=cfg.data.workers, progress=not args.quiet)
    else:
        data = nullcontext(args.data)
    with data as data_dir:  # the engine (torch) loads after the photos are checked: bad ones are refused at once
        from .train.engine import _dist_info, train
        from .train.launch import launch_ddp, train_folds

        if args.gpus > 1:  # every rank reads the settings from one file; the run folder is rank 0's to write
            with tempfile.TemporaryDirectory() as tmp:
                cfg.save(Path(tmp) / "config.json")
                sys.exit(launch_ddp(Path(tmp) / "config.json", data_dir, args.out, nproc=args.gpus))
        if args.all_folds:
            results = train_folds(cfg, data_dir, args.out, progress=not args.quiet)
        else:
            results = [train(cfg, data_dir, args.out, prepared_root=args.prepared, progress=not args.quiet)]
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
    from .kaggle.env import default_cache_dir, is_kaggle, default_prepared_root
    from .pipeline import embed_split

    cfg = _config(args)
    out = Path(args.out)
    cache = Path(cfg.embed.cache_dir or (default_cache_dir() if is_kaggle() else out / "cache"))
    prepared = Path(args.prepared) if args.prepared else default_prepared_root()
    for split in args.split:
        emb = embed_split(args.checkpoint, args.data, split, cache, prepared, cfg, device=cfg.train.device,
                          progress=not args.quiet)
        path = emb.save(out / f"embeddings_{split}.npz")
        print(f"{len(emb.names)} {split} embeddings -> {path}")


def cmd_score(args: argparse.Namespace) -> None:
    from .pipeline import Embeddings, read_labels, score, unlabelled, unlabelled_note

    cfg = _config(args)
    sets, labels = [Embeddings.load(p) for p in args.embeddings], read_labels(args.labels)
    missing = unlabelled(sets, labels)
    result = score(sets, labels, cfg.retrieval, warn=False)
    if missing:  # never a silent subset
        print(f"note: {unlabelled_note(missing, len(sets[0].names))} in {args.labels}; scored the other "
              f"{result['raw']['n_images']}", file=sys.stderr)
    for tag, r in result.items():
        print(f"{tag:9s} identity-balanced mAP {r['map']:.4f}  rank-1 {r['rank1']:.4f}")
    if args.per_identity:
        print(result["reranked" if cfg.retrieval.rerank else "raw"]["per_identity"].to_string(index=False))
    if getattr(args, "open_set", False):
        _score_open_set(args)


def cmd_submit(args: argparse.Namespace) -> None:
    from .pipeline import Embeddings, submit

    cfg = _config(args)
    out = Path(args.out)
    path = submit([Embeddings.load(p) for p in args.embeddings], args.data, out / "submission.csv", cfg.retrieval,
                  grid_png=out / "retrieval_grid.png")
    print(f"wrote {path}\nsubmit with: kaggle competitions submit -c jaguar-re-id -f {path} -m \"jaguar_kit\"")


def cmd_tune(args: argparse.Namespace) -> None:
    from .pipeline import Embeddings, read_labels
    from .tune import TTA_ORDER, summary, tune_folds, write_outputs

    cfg = _config(args)
    out = Path(args.out)
    if args.folds:  # every fold's own validation images and model: the choice rests on every identity
        from .kaggle.env import default_cache_dir, default_prepared_root, is_kaggle
        from .pipeline import embed_folds

        if not args.data:
            raise JaguarKitError("tune --folds needs --data (the competition folder the folds were trained on)")
        folds = embed_folds(args.folds, args.data, cfg.embed.cache_dir or (default_cache_dir() if is_kaggle() else
                                                                           out / "cache"),
                            args.prepared or default_prepared_root(), cfg, args.tta or [cfg.embed.tta],
                            device=cfg.train.device, progress=not args.quiet)
    else:
        if args.tta or args.prepared:
            raise JaguarKitError("tune: --tta and --prepared go with --folds (with --embeddings, prefix TTA=)")
        variants: dict[str, list] = {}
        for item in args.embeddings:  # [TTA=]PATH; items of one TTA setting are the models of an ensemble
            tta, sep, path = item.partition("=")
            if not sep or tta not in TTA_ORDER:
                tta, path = cfg.embed.tta, item
            variants.setdefault(tta, []).append(Embeddings.load(path))
        folds = {"validation": variants}
    paths = None
    if args.data:
        from .data.competition import load_competition

        comp = load_competition(args.data, check_images=False)
        paths = dict(zip(comp.train["filename"].astype(str), comp.train["path"]))
    labels = args.labels or (Path(args.data) / "train.csv" if args.data else None)
    if labels is None:
        raise JaguarKitError("tune: give --labels (a filename,ground_truth CSV) or --data")
    result = tune_folds(folds, read_labels(labels), cfg.retrieval, image_paths=paths,
                        local_cache=Path(args.local_cache) if args.local_cache else out / "local_cache",
                        base_tta=cfg.embed.tta, seed=args.seed, workers=cfg.data.workers, progress=not args.quiet)
    files = write_outputs(result, out)
    print(summary(result))
    print(f"wrote {files['config']}, {files['table'].name}, {files['report'].name}\n"
          f"submit with it: jaguar-kit submit --config {files['config']} --data DATA --out OUT --embeddings TEST.npz")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(data=args.data, out=args.out, overrides=args.set, progress=not args.quiet, minutes=args.minutes)


def _score_open_set(args: argparse.Namespace) -> None:
    """The open-set report of ``score --open-set``: identities held out as new individuals."""
    from .photos.evaluate import evaluate_open_set
    from .pipeline import Embeddings, read_labels

    labels = read_labels(args.labels)
    emb = Embeddings.load(args.embeddings[0])
    names = [n for n in emb.names if n in labels]
    emb = emb.subset(names)
    f = evaluate_open_set(emb.vectors, [labels[n] for n in names], new_share=args.new_share, seed=args.seed,
                          target_false_merge=args.target_false_merge)
    print(f"open set ({f['catalogue_individuals']} known individuals, {f['new_individuals']} held out as new; "
          f"{f['known_queries']} known and {f['new_queries']} new queries)")
    print(f"  top-1 known {f['top1_known']:.4f}  top-5 known {f['top5_known']:.4f}  "
          f"AUROC known vs new {f['auroc_known_vs_new']:.4f}")
    print(f"  at the calibrated threshold (score {f['threshold']:.4f}): false-merge {f['false_merge']:.4f} "
          f"(target {f['target_false_merge']:.2f})  false-split {f['false_split']:.4f}  "
          f"wrong individual {f['wrong_individual']:.4f}")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

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

    p = sub.add_parser("train", help="train (or resume: the same command again) a re-ID model; --out is the run folder")
    _add_common(p, data=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a competition-shaped folder (train.csv, test.csv, images)")
    add_photos_arguments(p, "your labelled photos: a folder per individual, a CSV path,identity[,x,y,w,h][,encounter] "
                         "or a catalogue; written to OUT/photos_data (boxes cut out, named by content)", source)
    p.add_argument("--prepared", help="prepared-image cache folder (default: $JAGUAR_KIT_PREPARED, else work/prepared; "
                   "on Kaggle a scratch folder outside the output); shared with embed")
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
    p.add_argument("--prepared", help="prepared-image cache folder (default: the one train uses)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("score", help="identity-balanced mAP and rank-1 of embeddings against labels")
    _add_common(p, data=False, out=False)
    p.add_argument("--embeddings", nargs="+", required=True, help="one or more embeddings .npz (several: an ensemble)")
    p.add_argument("--labels", required=True, help="a filename,ground_truth CSV (train.csv, solution.csv)")
    p.add_argument("--per-identity", action="store_true")
    p.add_argument("--open-set", action="store_true",
                   help="also hold identities out as new individuals: top-1/top-5 known, AUROC, false-merge/split rates")
    p.add_argument("--new-share", type=share, default=0.3, help="--open-set: share of identities held out as new")
    p.add_argument("--target-false-merge", type=share, default=0.05, help="--open-set: the calibration's target")
    p.add_argument("--seed", type=int, default=0, help="--open-set: which identities are held out")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("submit", help="write submission.csv from test embeddings (QE, re-ranking, ensembles)")
    _add_common(p)
    p.add_argument("--embeddings", nargs="+", required=True, help="test embeddings .npz, one per model")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("tune", help="choose TTA, QE, re-ranking and the local fusion on validation; writes tuned.json")
    _add_common(p, data=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", nargs="+", metavar="[TTA=]NPZ",
                        help="validation embeddings, one per model; prefix none=, hflip= or flip4= to compare TTA "
                             "settings (unprefixed: embed.tta)")
    source.add_argument("--folds", metavar="RUN",
                        help="a train --all-folds run: each fold's validation images embedded by its own best.pt "
                             "(cached in OUT/cache), scored within the fold, per-identity APs pooled over the folds")
    p.add_argument("--tta", nargs="+", choices=["none", "hflip", "flip4"],
                   help="--folds: TTA settings to embed and compare (default: embed.tta)")
    p.add_argument("--prepared", help="--folds: prepared-image cache folder (default: the one train uses)")
    p.add_argument("--labels", help="filename,ground_truth CSV (default: DATA/train.csv)")
    p.add_argument("--data", help="the competition folder: turns on local-feature verification on its train images "
                                  "(with --folds: the folder the folds were trained on; verification stays off)")
    p.add_argument("--local-cache", help="local-feature cache folder (default: OUT/local_cache)")
    p.add_argument("--seed", type=int, default=0, help="which identities form each half of the held-out check")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="the whole pipeline on a CPU on synthetic data (or --data), with a report")
    p.add_argument("--data", help="a competition-shaped folder (default: generate the synthetic one)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.add_argument("--minutes", type=float, default=12.0,
                   help="time budget of the demo; fine-tuning gets 60%% of it, as many epochs as fit")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    add_photo_commands(sub)

    kp = sub.add_parser("kaggle", help="Kaggle delivery: push kernels")
    ksub = kp.add_subparsers(dest="kaggle_command", required=True, metavar="ACTION")
    p = ksub.add_parser("push", help="convert a kernel to a notebook, validate its metadata, kaggle kernels push")
    p.add_argument("kernel", help="train, infer, submit, or a folder with kernel-metadata.json")
    p.add_argument("--user", help="Kaggle user name (default: KAGGLE_USERNAME)")
    p.add_argument("--build", default="build/kaggle", help="build folder")
    p.add_argument("--resume", action="store_true",
                   help="also attach this kernel's own previous output (to resume a timed-out session)")
    p.add_argument("--dry-run", action="store_true", help="stop before the network; print the command")
    from .kaggle.push import add_source_arguments, push_from_args

    add_source_arguments(p)  # --dataset, --model, --kernel, --competition
    p.set_defaults(func=push_from_args)
    return parser


# OS errors that are about the user's files and folders, not bugs: shown as one line.
_USER_OS_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except JaguarKitError as e:
        from .errors import plain_message  # one line also when a loader worker raised it

        print(f"error: {plain_message(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a folder or file the system refuses (read-only, permissions): one line
        if e.errno not in _USER_OS_ERRORS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
