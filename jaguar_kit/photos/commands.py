"""The own-photos commands of ``jaguar-kit``: index, identify, cluster, review.

Arguments become photos in one place (:func:`photos_from_args`: ``--photos``, and for whole
camera-trap frames MegaDetector's ``--detections``), shared with ``train --photos``. The photo
modules load OpenCV and torch: each command imports what it needs when it runs, so
``jaguar-kit --help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import JaguarKitError

if TYPE_CHECKING:
    from .inputs import Photo


def add_photos_arguments(p: argparse.ArgumentParser, photos_help: str, one_of=None) -> None:
    """``--photos`` (required, or one of the group ``one_of``) and, for whole camera-trap frames,
    ``--detections`` and ``--detection-threshold`` (read by :func:`photos_from_args`)."""
    if one_of is None:
        p.add_argument("--photos", required=True, help=photos_help)
    else:
        one_of.add_argument("--photos", help=photos_help)
    p.add_argument("--detections", metavar="MD_JSON",
                   help="MegaDetector's output JSON for the frames in --photos (its paths relative to the --photos "
                        "folder, or the CSV's): one photo per animal box, the frame's individual kept")
    p.add_argument("--detection-threshold", type=_confidence, default=None, metavar="CONF",
                   help="--detections: animal boxes at this confidence or more (default: the file's "
                        "typical_detection_threshold, else 0.2, MegaDetector v5's)")


def photos_from_args(args: argparse.Namespace, exclude: list[str | Path], folder_labels: bool = True,
                     need_identity: bool = False) -> list[Photo]:
    """The photos ``--photos`` names, one per animal box when ``--detections`` is given: the one place
    where arguments become photos (index, identify, cluster; train --photos)."""
    from .detections import read_detections
    from .inputs import read_photos

    if args.detection_threshold is not None and not args.detections:
        raise JaguarKitError("--detection-threshold needs --detections (MegaDetector's output JSON)")
    photos = read_photos(args.photos, folder_labels=folder_labels, need_identity=need_identity, exclude=exclude)
    if args.detections:
        source = Path(args.photos)
        photos = read_detections(args.detections, source if source.is_dir() else source.parent,
                                 args.detection_threshold, photos=photos)
    return photos


def _print_warnings(warnings) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def cmd_index(args: argparse.Namespace) -> None:
    from .catalogue import NPZ, build_catalogue, catalogue_model, load_catalogue, photos_to_reindex
    from .model import load_model

    if args.catalogue:  # re-index: the catalogue's photos, individuals and boxes, embedded by another model
        if args.detections:
            raise JaguarKitError("--detections goes with --photos: a catalogue's photos already have their boxes")
        photos = photos_to_reindex(args.catalogue, args.out, args.model)
    else:
        photos = photos_from_args(args, exclude=[args.out], need_identity=True)
    if args.model:
        model = load_model(args.model, device=args.device, weights=args.weights, prepared_size=args.prepared_size)
    elif (Path(args.out) / NPZ).is_file():  # updating a catalogue: its own model, found by its digest
        model = catalogue_model(load_catalogue(args.out), device=args.device, weights=args.weights)
    else:
        raise JaguarKitError(f"{args.out}: a new catalogue needs --model: a checkpoint you trained (--model "
                             "RUN/best.pt, from jaguar-kit train), or offline and without training --model "
                             "frozen:efficientnet-lite0 (pretrained, weaker)")
    # its warnings are shown once, as build_catalogue logs them
    cat = build_catalogue(photos, model, args.out, target_false_merge=args.target_false_merge, replace=args.replace,
                          progress=not args.quiet, workers=args.workers, coat=args.coat)
    cal = cat.calibration
    evidence = "" if cal is None else (" (global score + coat pattern)" if cal.uses_coat else
                                       f" (score {cal.threshold:.4f})")
    rule = ("not calibrated" if cal is None else
            f"new individual below p={cal.probability_threshold:.3f}{evidence}, target false-merge "
            f"rate {cal.target_false_merge:.0%}; on the catalogue {cal.estimated['false_merge']:.1%} false merges, "
            f"{cal.estimated['false_split']:.1%} known photos called new, "
            f"{cal.estimated['decided_correctly']:.1%} decided correctly")
    if cat.banner:
        print(cat.banner, file=sys.stderr)
    print(f"catalogue {args.out}: {len(cat)} photos of {len(cat.individuals)} individuals "
          f"({cat.embedded_now} embedded now, the others reused); {rule}")


def cmd_identify(args: argparse.Namespace) -> None:
    from .catalogue import load_catalogue
    from .identify import identify
    from .inputs import mark_kit_folder
    from .model import load_model
    from .report import write_identify_report

    cat = load_catalogue(args.catalogue)
    model = None
    if args.model:
        model = load_model(args.model, device=args.device, weights=args.weights,
                           prepared_size=cat.model.get("prepared_size"), tta=cat.model.get("tta", "none"))
    out = Path(args.out)
    photos = photos_from_args(args, exclude=[out], folder_labels=False)
    mark_kit_folder(out)
    # photos are cached in the catalogue, where cluster finds them embedded already
    result = identify(cat, photos, model=model, top_k=args.top_k, cache_dir=cat.cache_dir(out / "cache"),
                      progress=not args.quiet, workers=args.workers)
    _print_warnings(cat.warnings)
    if cat.banner:
        print(cat.banner, file=sys.stderr)
    csv_path = result.save_csv(out / "identify.csv")
    page = write_identify_report(result, out / "report.html")
    bands = result.table["confidence"].value_counts()
    counts = ", ".join(f"{bands[b]} {b}" for b in ("almost certainly", "probably", "possibly", "doubtful", "new",
                                                     "uncalibrated") if b in bands)
    print(f"{len(result.decisions)} photos ({counts}) -> {csv_path}, {page}")


def cmd_cluster(args: argparse.Namespace) -> None:
    from .catalogue import load_catalogue
    from .cluster import cluster
    from .folders import write_group_folders
    from .inputs import mark_kit_folder
    from .model import load_model
    from .report import write_cluster_report

    cat = load_catalogue(args.catalogue) if args.catalogue else None
    model = None
    if args.model:
        model = load_model(args.model, device=args.device, weights=args.weights,
                           prepared_size=cat.model.get("prepared_size") if cat else args.prepared_size,
                           tta=cat.model.get("tta", "none") if cat else "none")
    out = Path(args.out)
    photos = photos_from_args(args, exclude=[out], folder_labels=False)
    mark_kit_folder(out)
    # with a catalogue, photos are cached in it, where identify finds them embedded already
    result = cluster(photos, model=model, catalogue=cat, threshold=args.threshold,
                     cache_dir=cat.cache_dir(out / "cache") if cat is not None else out / "cache",
                     progress=not args.quiet, workers=args.workers)
    csv_path = result.save_csv(out / "clusters.csv")
    page = write_cluster_report(result, out / "report.html")
    if args.folders:
        write_group_folders(result, out / "groups", args.folders)
    print(f"{len(result.photos)} photos in {len(result.group_names)} groups -> {csv_path}, {page}"
          + (f", {out / 'groups'}/ ({'links' if args.folders == 'link' else 'copies'})" if args.folders else ""))


def cmd_review(args: argparse.Namespace) -> None:
    from .review import apply_decisions

    result = apply_decisions(args.catalogue, args.decisions, device=args.device, progress=not args.quiet)
    if result.catalogue is not None:
        _print_warnings(result.catalogue.warnings)
    print(f"{args.decisions}: {result.summary()}; history: {result.history}")


def _top_k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of candidates, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (candidates shown per photo), got {value}")
    return value


def _number_in(low: float, high: float, what: str, strict: bool = False):
    """An argparse type: a number from ``low`` to ``high`` (``strict``: strictly between), else
    one line saying what it should be (``what``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        inside = low < value < high if strict else low <= value <= high  # NaN is never inside
        if not inside:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return value

    return parse


_similarity = _number_in(-1, 1, "a cosine similarity between -1 and 1")
_confidence = _number_in(0, 1, "a detection confidence from 0 to 1 (e.g. 0.2)")
share = _number_in(0, 1, "a share strictly between 0 and 1 (e.g. 0.05)", strict=True)


def _add_photo_model(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--model", default=default,
                   help="a training checkpoint (best.pt) or frozen:BACKBONE, e.g. frozen:efficientnet-lite0 offline"
                        + (f" (default {default})" if default else " (default: the catalogue's)"))
    p.add_argument("--weights", default="auto", help="pretrained weights for frozen:BACKBONE (auto, a folder, hf-hub:...)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="processes decoding photos")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_photo_commands(sub) -> None:
    """Register index, identify, cluster and review on the sub-command parser ``sub``."""
    p = sub.add_parser("index", help="build or update a catalogue of known individuals from your photos",
                       description="Build or update a catalogue from your labelled photos (--photos), or re-index "
                                   "a catalogue with a better model (--catalogue OLD --model RUN/best.pt --out NEW: "
                                   "every photo of OLD under its reviewed individual and box, embedded anew into "
                                   "NEW; OLD is left as it is).")
    source = p.add_mutually_exclusive_group(required=True)
    add_photos_arguments(p, "a folder with a sub-folder per individual, or a CSV path,identity[,x,y,w,h]", source)
    source.add_argument("--catalogue", help="re-index this catalogue's photos with --model into --out (a new folder)")
    p.add_argument("--out", required=True, help="the catalogue folder (updated if it exists: only new photos are embedded)")
    p.add_argument("--target-false-merge", type=share, default=0.05,
                   help="share of a new animal's photos allowed to be attached to a known one (default 0.05)")
    p.add_argument("--replace", action="store_true", help="drop catalogue photos that are not listed now")
    p.add_argument("--coat", choices=("auto", "on", "off"), default="auto",
                   help="match coat patterns (keypoints) as well as the global score when deciding; auto: where "
                        "the catalogue's own held-out photos are decided correctly more often with it (default)")
    p.add_argument("--prepared-size", type=int, default=None, help="longest side of the prepared photos (default 768)")
    _add_photo_model(p, None)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("identify", help="top-k known individuals of each photo, or `new`; identify.csv and report.html")
    p.add_argument("--catalogue", required=True, help="a catalogue folder made by `jaguar-kit index`")
    add_photos_arguments(p, "a folder of photos (sub-folders allowed), a CSV path[,identity,x,y,w,h], or one photo")
    p.add_argument("--out", required=True, help="the result folder")
    p.add_argument("--top-k", type=_top_k, default=5, help="candidates shown per photo (default 5)")
    _add_photo_model(p, None)
    p.set_defaults(func=cmd_identify)

    p = sub.add_parser("cluster", help="group unlabelled photos by individual; clusters.csv, report.html, folders")
    add_photos_arguments(p, "a folder of photos (sub-folders allowed), a CSV path[,x,y,w,h], or one photo")
    p.add_argument("--out", required=True, help="the result folder")
    p.add_argument("--catalogue", help="attach groups to its known individuals; its calibration sets the threshold")
    p.add_argument("--threshold", type=_similarity, help="link photos at this similarity or more (default: the catalogue's)")
    p.add_argument("--folders", choices=["link", "copy"], help="also write OUT/groups/<group>/ with links or copies")
    p.add_argument("--prepared-size", type=int, default=None, help="longest side of the prepared photos (default 768)")
    _add_photo_model(p, None)
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("review", help="apply decisions.csv (exported from report.html) to a catalogue; it recalibrates")
    p.add_argument("--catalogue", required=True, help="the catalogue folder the report was made with")
    p.add_argument("--decisions", required=True, help="decisions.csv exported by report.html's Export button")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (embeds the photos added)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_review)
