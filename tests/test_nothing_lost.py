"""Issue 12, the data and inference half: nothing lost, nothing silently wrong.

Caches keyed by content, prepared images verified, the manifest kept across kills, one CSV
reader, the Python API that never hangs, one-line errors (also from loader workers), and
path-like file names. Each test reproduces a case that went wrong before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import PYTHON, TINY_OVERRIDES, cli_env, run_cli
from jaguar_kit import cli
from jaguar_kit.config import Config, apply_overrides
from jaguar_kit.data.competition import load_competition, read_csv_checked
from jaguar_kit.data.dataset import ImageDataset, build_transform
from jaguar_kit.data.prepare import load_prepared, prepare_images, prepared_dir
from jaguar_kit.embed import compute_embeddings, embed_images
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.models import build_model
from jaguar_kit.pipeline import Embeddings, read_labels, score, submit

CPU = torch.device("cpu")


def _tiny_config() -> Config:
    return apply_overrides(Config(), list(TINY_OVERRIDES))


def _rgba(path: Path, seed: int, empty: bool = False, size=(48, 64)) -> None:
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
    img[..., 3] = 0
    if not empty:
        img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


@contextlib.contextmanager
def _tmpfs(path: Path, size_bytes: int, options: str = ""):
    """A real small filesystem (needs root); skips where it cannot be mounted."""
    path.mkdir(parents=True)
    opts = f"size={size_bytes}" + (f",{options}" if options else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_tiny_config().model).eval()


@pytest.fixture(scope="module")
def prepared(competition, tmp_path_factory):
    comp = load_competition(competition)
    names = list(comp.train["filename"][:12])
    result = prepare_images(list(comp.train["path"][:12]), tmp_path_factory.mktemp("prep"), size=96, workers=0,
                            progress=False)
    return names, [result[n] for n in names]


def _embed(model, names, paths, cache, **kw):
    kw = {"chunk_size": 5, "batch_size": 4, "progress": False, "tta": "none", **kw}
    return embed_images(model, names, paths, cache, CPU, **kw)


# --- 1. embedding chunks are keyed by the images' content --------------------------------

def test_replaced_image_under_the_same_name_is_embedded_again_only_its_chunk(model, prepared, tmp_path):
    names, paths = prepared
    files = [tmp_path / "img" / f"{i}.jpg" for i in range(len(paths))]
    for src, dst in zip(paths, files):
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dst)
    first = _embed(model, names, files, tmp_path / "cache")  # no preprocessing= (the Python API)
    shutil.copyfile(paths[0], files[6])  # another picture under the name of image 6 (chunk 1)
    second = _embed(model, names, files, tmp_path / "cache")
    assert second.reused_chunks == [0, 2] and second.computed_chunks == [1]
    np.testing.assert_allclose(second.embeddings[6], first.embeddings[0], atol=1e-5)
    np.testing.assert_allclose(np.delete(second.embeddings, 6, 0), np.delete(first.embeddings, 6, 0), atol=1e-6)


def test_replaced_test_image_changes_the_cli_embeddings(competition, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(competition, data)
    run = tmp_path / "run"
    assert run_cli("train", "--data", data, "--out", run, overrides=[*TINY_OVERRIDES, "train.epochs=1"]).returncode == 0
    embed = ("embed", "--data", data, "--out", tmp_path / "emb", "--checkpoint", run / "best.pt")
    assert run_cli(*embed, overrides=["embed.tta=none"]).returncode == 0
    before = Embeddings.load(tmp_path / "emb" / "embeddings_test.npz")
    test_dir = data / "test" / "test"
    a, b = before.names[0], before.names[1]
    shutil.copyfile(test_dir / b, test_dir / a)  # same name, another jaguar's picture
    rerun = run_cli(*embed, overrides=["embed.tta=none"])
    assert rerun.returncode == 0, rerun.stderr
    after = Embeddings.load(tmp_path / "emb" / "embeddings_test.npz")
    np.testing.assert_allclose(after.vectors[0], before.vectors[1], atol=1e-5)
    np.testing.assert_allclose(after.vectors[2:], before.vectors[2:], atol=1e-6)


# --- 2. prepared images verified; the manifest survives a kill ---------------------------

def test_damaged_prepared_jpeg_is_detected_and_prepared_again(tmp_path):
    srcs = [tmp_path / "src" / f"a{i}.png" for i in range(4)]
    for i, p in enumerate(srcs):
        _rgba(p, i)
    first = prepare_images(srcs, tmp_path / "cache", size=64, workers=0, progress=False)
    good = first[srcs[2]].read_bytes()
    first[srcs[2]].write_bytes(good[: len(good) // 2])  # truncated on disk (a kill, a bad copy)
    again = prepare_images(srcs, tmp_path / "cache", size=64, workers=0, progress=False)
    assert again.made == 1 and again.skipped == 3
    assert again[srcs[2]].read_bytes() == good


def test_damaged_prepared_jpeg_is_refused_in_one_line_when_loaded(tmp_path):
    _rgba(tmp_path / "a.png", 0)
    path = prepare_images([tmp_path / "a.png"], tmp_path / "cache", size=64, workers=0, progress=False)["a.png"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # OpenCV decodes this into a partly grey picture, without a word
    with pytest.raises(JaguarKitError, match=r"a\.png.*damaged") as e:
        load_prepared(path)
    assert "\n" not in str(e.value)


_PREPARE_SCRIPT = """
import sys
from pathlib import Path
from jaguar_kit.data.prepare import prepare_images
srcs = sorted(Path(sys.argv[1]).glob("*.png"))
r = prepare_images(srcs, sys.argv[2], size=64, workers=0, progress=False)
print("EMPTY", len(r.empty_masks), "MADE", r.made)
"""


def test_killed_prepare_remembers_the_empty_masks(tmp_path):
    src = tmp_path / "src"
    for i in range(20):
        _rgba(src / f"img_{i:02d}.png", i, empty=i % 2 == 0)  # 10 empty masks
    script = tmp_path / "prep.py"
    script.write_text(_PREPARE_SCRIPT)
    cmd = [PYTHON, str(script), str(src), str(tmp_path / "cache")]
    killed = subprocess.run(cmd, env=cli_env(JAGUAR_KIT_FAULT="prepare-image:12"), capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    empty, made = resumed.stdout.split()[1], int(resumed.stdout.split()[3])
    assert empty == "10" and made <= 9  # 11 or 12 finished before the kill are not redone


# --- 3. the Python API never hangs -------------------------------------------------------

def _run_script(script: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([PYTHON, str(script)], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=script.parent)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{script.name} still running after {timeout} s (respawning workers?)")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_plain_script_with_default_workers_finishes_with_a_warning(tmp_path):
    for i in range(4):
        _rgba(tmp_path / "src" / f"img_{i}.png", i)
    script = tmp_path / "plain.py"  # no `if __name__ == "__main__":` guard
    script.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from jaguar_kit.data.prepare import prepare_images
        r = prepare_images(sorted(Path({str(tmp_path / 'src')!r}).glob("*.png")), {str(tmp_path / 'cache')!r},
                           size=64, progress=False)
        print("DONE", len(r))
    """))
    done = _run_script(script)
    assert done.returncode == 0 and "DONE 4" in done.stdout, done.stderr[-2000:]
    assert "__main__" in done.stderr and done.stderr.count("Traceback") == 0


def test_guarded_script_still_uses_worker_processes(tmp_path):
    for i in range(4):
        _rgba(tmp_path / "src" / f"img_{i}.png", i)
    script = tmp_path / "guarded.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing
        from pathlib import Path
        from jaguar_kit.data.prepare import prepare_images

        def main():
            r = prepare_images(sorted(Path({str(tmp_path / 'src')!r}).glob("*.png")), {str(tmp_path / 'cache')!r},
                               size=64, progress=False, workers=2)
            print("DONE", len(r), "CHILDREN", len(multiprocessing.active_children()) >= 0)

        if __name__ == "__main__":
            main()
    """))
    done = _run_script(script)
    assert done.returncode == 0 and "DONE 4" in done.stdout, done.stderr[-2000:]
    assert "__main__" not in done.stderr  # no fallback warning: the guard is there


# --- 4. one CSV reader --------------------------------------------------------------------

def test_labels_with_stray_spaces_and_na_identities_are_read_like_train(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,ground_truth\n a.png ,NA\nb.png,null \n c.png,None\n")
    assert read_labels(labels) == {"a.png": "NA", "b.png": "null", "c.png": "None"}


def test_latin1_csv_is_named_as_an_encoding_problem(tmp_path):
    (tmp_path / "train" / "train").mkdir(parents=True)
    _rgba(tmp_path / "train" / "train" / "Jos\u00e9.png", 0)
    _rgba(tmp_path / "train" / "train" / "x.png", 1)
    (tmp_path / "train.csv").write_bytes("filename,ground_truth\nx.png,A\nJos\u00e9.png,B\n".encode("latin-1"))
    with pytest.raises(JaguarKitError) as e:
        load_competition(tmp_path)
    msg = str(e.value)
    assert "train.csv" in msg and "UTF-8" in msg and "line 3" in msg and "not found" not in msg


def test_score_reads_labels_with_the_one_reader_and_says_what_has_no_label(tmp_path, capsys):
    rng = np.random.default_rng(0)
    names = [f"i{k}.png" for k in range(8)]
    vectors = rng.normal(size=(8, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    Embeddings(names, vectors, "m").save(tmp_path / "e.npz")
    rows = [f"{' ' if k % 3 == 0 else ''}{n},{'AB'[k % 2]}" for k, n in enumerate(names[:6])]  # i6, i7 unlabelled
    (tmp_path / "labels.csv").write_text("filename,ground_truth\n" + "\n".join(rows) + "\n")
    cli.main(["score", "--embeddings", str(tmp_path / "e.npz"), "--labels", str(tmp_path / "labels.csv"), "--quiet"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert "2 of the 8 embedded images have no label" in text and "i6.png" in text
    # the spaced rows count: 6 labelled images scored, not 4
    result = score([Embeddings.load(tmp_path / "e.npz")], read_labels(tmp_path / "labels.csv"), Config().retrieval)
    assert result["raw"]["n_images"] == 6


def test_one_reader_for_every_table(tmp_path):
    (tmp_path / "s.csv").write_text("row_id,similarity\n 1 ,0.5\nNA,0.2\n")
    df = read_csv_checked(tmp_path / "s.csv", ("row_id", "similarity"))
    assert list(df["row_id"]) == ["1", "NA"]


# --- 5. one line instead of a traceback ---------------------------------------------------

def test_read_only_out_is_one_line_for_submit(competition, tmp_path, capsys):
    comp = load_competition(competition)
    names = list(comp.test_images["filename"])
    Embeddings(names, np.eye(len(names), 8, dtype=np.float32) + 0.01, "m").save(tmp_path / "e.npz")
    with _tmpfs(tmp_path / "ro", 1 << 20, "ro") as ro:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["submit", "--data", str(competition), "--out", str(ro / "sub"), "--embeddings",
                      str(tmp_path / "e.npz"), "--quiet"])
    assert exit_.value.code == 2
    err = _one_error_line(capsys)
    assert "read-only" in err.lower() and "sub" in err


def test_read_only_out_is_one_line_for_embed(competition, tmp_path):
    with _tmpfs(tmp_path / "ro", 1 << 20, "ro") as ro:
        done = run_cli("embed", "--data", competition, "--out", ro / "emb", "--checkpoint", "frozen:tiny-cnn",
                       overrides=["model.weights=none", "data.prepared_size=64", "embed.tta=none"])
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "read-only" in err.lower() and "Traceback" not in err, err


def test_chunk_of_the_wrong_width_is_recomputed(model, prepared, tmp_path):
    names, paths = prepared
    first = _embed(model, names, paths, tmp_path)
    chunk = tmp_path / "images_00001.npz"
    with np.load(chunk) as z:
        fields = dict(z)
    fields["embeddings"] = np.ones((5, 7), np.float32)  # another width, same fingerprint
    np.savez_compressed(chunk, **fields)
    second = _embed(model, names, paths, tmp_path)
    assert second.computed_chunks == [1]
    np.testing.assert_allclose(second.embeddings, first.embeddings, atol=1e-6)


def test_missing_prepared_file_under_loader_workers_is_one_line(prepared, model, tmp_path):
    names, paths = prepared
    files = []
    for i, p in enumerate(paths[:4]):
        files.append(tmp_path / f"{i}.jpg")
        shutil.copyfile(p, files[-1])
    files[2].unlink()
    cfg = model.data_config
    ds = ImageDataset(files, None, build_transform(tuple(cfg["input_size"])[-2:], cfg["mean"], cfg["std"]))
    with pytest.raises(JaguarKitError) as e:
        compute_embeddings(model, ds, CPU, batch_size=2, workers=1)
    msg = str(e.value)
    assert "2.jpg" in msg and "\n" not in msg and "Traceback" not in msg


def test_cli_prints_one_line_for_an_error_wrapped_by_a_loader_worker(tmp_path, capsys, monkeypatch):
    from torch._utils import ExceptionWrapper

    def failing(args):
        try:
            raise JaguarKitError(f"{tmp_path}/x.jpg: prepared image missing")
        except JaguarKitError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    monkeypatch.setattr(cli, "cmd_score", failing)
    with pytest.raises(SystemExit):
        cli.main(["score", "--embeddings", "e.npz", "--labels", "l.csv"])
    err = _one_error_line(capsys)
    assert err == f"error: {tmp_path}/x.jpg: prepared image missing"


def test_submit_with_more_embeddings_than_test_images(competition, tmp_path, caplog):
    comp = load_competition(competition)
    test, train = list(comp.test_images["filename"]), list(comp.train["filename"][:5])
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(len(test) + 5, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    both = Embeddings(train + test, vectors, "m")
    only_test = both.subset(test)
    cfg = Config().retrieval
    a = submit([both], competition, tmp_path / "a" / "submission.csv", cfg, grid_png=tmp_path / "a" / "grid.png")
    assert "5 embedded images are not in" in caplog.text
    b = submit([only_test], competition, tmp_path / "b" / "submission.csv", cfg)
    assert a.read_text() == b.read_text()  # re-ranked over the test images only
    assert (tmp_path / "a" / "grid.png").is_file()


# --- 6. path-like file names ---------------------------------------------------------------

def _subfolder_competition(competition: Path, root: Path) -> Path:
    """The synthetic competition with train images in one folder per identity (``Ana/x.png``)."""
    comp = load_competition(competition)
    shutil.copytree(competition / "test", root / "test")
    shutil.copyfile(competition / "test.csv", root / "test.csv")
    rows = []
    for name, ident, path in comp.train[["filename", "identity", "path"]].itertuples(index=False):
        rel = f"{ident}/{name}"
        (root / "train" / ident).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / "train" / rel)
        rows.append(f"{rel},{ident}")
    (root / "train.csv").write_text("filename,ground_truth\n" + "\n".join(rows) + "\n")
    return root


def test_subfolder_file_names_train_and_embed(competition, tmp_path):
    data = _subfolder_competition(competition, tmp_path / "data")
    run = tmp_path / "run"
    trained = run_cli("train", "--data", data, "--out", run, overrides=[*TINY_OVERRIDES, "train.epochs=1"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    done = run_cli("embed", "--data", data, "--out", tmp_path / "emb", "--checkpoint", run / "best.pt", "--split",
                   "train", overrides=["embed.tta=none"])
    assert done.returncode == 0, done.stderr[-3000:]
    emb = Embeddings.load(tmp_path / "emb" / "embeddings_train.npz")
    assert "/" in emb.names[0] and len(emb.names) == len(set(emb.names)) == 36


def test_same_file_name_in_two_identity_folders(tmp_path):
    _rgba(tmp_path / "photos" / "Ana" / "x.png", 0)
    _rgba(tmp_path / "photos" / "Bo" / "x.png", 1, size=(48, 64))
    got = prepare_images([tmp_path / "photos" / "Ana" / "x.png", tmp_path / "photos" / "Bo" / "x.png"],
                         tmp_path / "cache", size=64, workers=0, progress=False)
    assert got["Ana/x.png"] != got["Bo/x.png"]
    assert not np.array_equal(load_prepared(got["Ana/x.png"]), load_prepared(got["Bo/x.png"]))


# --- 7. adversarial cases: bad files, faults, races ------------------------------------------

def _mini(root: Path, names: dict[str, np.ndarray | bytes], rows: list[tuple[str, str]]) -> Path:
    for n, img in names.items():
        p = root / "train" / "train" / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(img) if isinstance(img, bytes) else cv2.imwrite(str(p), img)
    (root / "train" / "train").mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text("filename,ground_truth\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return root


def test_symlink_loop_in_the_image_folder_is_not_an_image(tmp_path):
    data = _mini(tmp_path / "d", {}, [("x.png", "A")])
    _rgba(data / "train" / "train" / "x.png", 0)
    folder = data / "train" / "train"
    os.symlink(folder / "b", folder / "a")
    os.symlink(folder / "a", folder / "b")  # a -> b -> a
    assert list(load_competition(data).train["filename"]) == ["x.png"]


def test_unicode_name_typed_in_another_normal_form_is_found(tmp_path):
    import unicodedata

    nfc = unicodedata.normalize("NFC", "\u00d1and\u00fa.png")
    data = _mini(tmp_path / "d", {}, [(nfc, "A")])
    _rgba(data / "train" / "train" / unicodedata.normalize("NFD", nfc), 0)  # as macOS stores it
    comp = load_competition(data)
    assert comp.train["path"][0].is_file() and comp.train["filename"][0] == nfc


def test_same_size_other_picture_is_prepared_again_and_touched_file_is_not(tmp_path):
    src = tmp_path / "a.png"
    rng = np.random.default_rng(0)
    write = lambda img: cv2.imwrite(str(src), img, [cv2.IMWRITE_PNG_COMPRESSION, 0])  # size depends on the shape only
    write(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    first = prepare_images([src], tmp_path / "c", size=64, workers=0, progress=False)
    before, size = first["a.png"].read_bytes(), src.stat().st_size
    os.utime(src, ns=(1, 1))  # touched, same content: no work
    assert prepare_images([src], tmp_path / "c", size=64, workers=0, progress=False).made == 0
    write(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))  # another picture, same byte count
    assert src.stat().st_size == size
    again = prepare_images([src], tmp_path / "c", size=64, workers=0, progress=False)
    assert again.made == 1 and again["a.png"].read_bytes() != before


def test_torn_manifest_line_of_a_killed_run_is_ignored(tmp_path):
    srcs = [tmp_path / f"a{i}.png" for i in range(3)]
    for i, p in enumerate(srcs):
        _rgba(p, i, empty=i == 2)
    prepare_images(srcs, tmp_path / "c", size=64, workers=0, progress=False)
    manifest = prepared_dir(tmp_path / "c", "crop", 0.05, 64) / "manifest.jsonl"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) - 20])  # the last record cut mid-line
    again = prepare_images(srcs, tmp_path / "c", size=64, workers=0, progress=False)
    assert again.made == 1 and again.empty_masks == ["a2.png"]


def test_fully_prepared_cache_on_a_read_only_disk_is_used(tmp_path):
    srcs = [tmp_path / f"a{i}.png" for i in range(3)]
    for i, p in enumerate(srcs):
        _rgba(p, i)
    with _tmpfs(tmp_path / "cache", 4 << 20) as cache:
        prepare_images(srcs, cache, size=64, workers=0, progress=False)
        assert subprocess.run(["mount", "-o", "remount,ro", str(cache)]).returncode == 0
        os.utime(srcs[0], ns=(5, 5))  # touched: the cache cannot record the new time, and need not
        again = prepare_images(srcs, cache, size=64, workers=0, progress=False)
        assert again.made == 0 and len(again) == 3


def test_disk_full_while_writing_a_chunk_is_one_line_and_resumes(model, prepared, tmp_path):
    names, paths = prepared
    with _tmpfs(tmp_path / "small", 64 << 10) as small:  # room for a few chunks only
        ballast = small / "ballast"
        ballast.write_bytes(b"\0" * (48 << 10))
        with pytest.raises(JaguarKitError, match="disk full") as e:
            _embed(model, names * 1, paths, small / "cache", chunk_size=1)
        assert "\n" not in str(e.value)
        done = sorted(p.name for p in (small / "cache").glob("*.npz"))
        assert done and not list((small / "cache").glob(".*tmp*"))
        ballast.unlink()
        resumed = _embed(model, names, paths, small / "cache", chunk_size=1)
        assert resumed.reused_chunks == list(range(len(done)))
        np.testing.assert_allclose(resumed.embeddings, _embed(model, names, paths, tmp_path / "ref").embeddings,
                                   atol=1e-6)


def test_a_live_process_write_in_progress_is_not_removed(model, prepared, tmp_path):
    """Two embedders on one cache: the second must not delete the first one's temporary file."""
    names, paths = prepared
    other = subprocess.Popen(["sleep", "60"])
    try:
        tmp = tmp_path / f".images_00000.npz.tmp-{other.pid}-abcd"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"half")
        dead = tmp_path / ".images_00001.npz.tmp-999999999-abcd"  # a killed writer's
        dead.write_bytes(b"half")
        _embed(model, names, paths, tmp_path)
        assert tmp.exists() and not dead.exists()
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("bad, match", [
    (dict(paths_short=True), "12 names but 11 image paths"),
    (dict(duplicate=True), "listed twice"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(tta="flip8"), "embed.tta"),
])
def test_bad_embed_arguments_are_one_line(model, prepared, tmp_path, bad, match):
    names, paths = prepared
    names, paths = list(names), list(paths)
    if bad.pop("paths_short", False):
        paths = paths[:-1]
    if bad.pop("duplicate", False):
        names[3] = names[2]
    with pytest.raises(JaguarKitError, match=match):
        _embed(model, names, paths, tmp_path, **bad)
    assert not list(tmp_path.glob("*.npz"))


@pytest.mark.parametrize("damage, match", [
    ("truncated", "not a jaguar_kit embeddings file"),
    ("nan", "not finite"),
    ("duplicate", "two vectors"),
    ("shape", "names but vectors of shape"),
])
def test_damaged_embeddings_file_is_one_line(tmp_path, damage, match):
    path = tmp_path / "e.npz"
    names, vectors = ["a.png", "b.png", "c.png"], np.eye(3, 4, dtype=np.float32)
    if damage == "nan":
        vectors[1, 0] = np.nan
    if damage == "duplicate":
        names[2] = "a.png"
    if damage == "shape":
        vectors = vectors[:2]
    np.savez_compressed(path, names=np.array(names), vectors=vectors, model=np.array("m"))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(JaguarKitError, match=match) as e:
        Embeddings.load(path)
    assert "\n" not in str(e.value)


def test_labels_of_other_images_are_refused_in_one_line(tmp_path):
    Embeddings(["a.png", "b.png"], np.eye(2, dtype=np.float32), "m").save(tmp_path / "e.npz")
    (tmp_path / "l.csv").write_text("filename,ground_truth\nx.png,A\ny.png,A\n")
    with pytest.raises(JaguarKitError, match=r"0 of the 2 embedded images have a label \(e.g. 'a.png'\)"):
        score([Embeddings.load(tmp_path / "e.npz")], read_labels(tmp_path / "l.csv"), Config().retrieval)


def test_conflicting_labels_name_both_lines(tmp_path):
    (tmp_path / "l.csv").write_text("filename,ground_truth\na.png,A\nb.png,B\na.png,C\n")
    with pytest.raises(JaguarKitError, match=r"'a.png' is labelled 'A' on line 2 and 'C' on line 4"):
        read_labels(tmp_path / "l.csv")


def test_submit_with_missing_test_embeddings_says_how_many(competition, tmp_path):
    comp = load_competition(competition)
    test = list(comp.test_images["filename"])
    Embeddings(test[:-2], np.eye(len(test) - 2, 8, dtype=np.float32), "m").save(tmp_path / "e.npz")
    with pytest.raises(JaguarKitError, match=rf"2 of the {len(test)} test images have no embedding"):
        submit([Embeddings.load(tmp_path / "e.npz")], competition, tmp_path / "s.csv", Config().retrieval)


def test_loader_workers_after_preparing_in_process_do_not_deadlock(tmp_path):
    """Preparing in this process starts OpenCV's thread pool; forked loader workers used to
    resize that inherited pool and wait forever."""
    script = tmp_path / "train_like.py"
    script.write_text(textwrap.dedent(f"""
        import cv2, numpy as np, torch
        from pathlib import Path
        from torch.utils.data import DataLoader
        from jaguar_kit.data.dataset import ImageDataset, build_transform, worker_init
        from jaguar_kit.data.prepare import prepare_images
        src = Path({str(tmp_path / 'src')!r}); src.mkdir()
        for i in range(4):
            cv2.imwrite(str(src / f"{{i}}.png"), np.random.default_rng(i).integers(0, 255, (900, 1400, 4), np.uint8))
        cv2.setNumThreads(4)
        r = prepare_images(sorted(src.glob("*.png")), {str(tmp_path / 'cache')!r}, size=96, workers=0, progress=False)
        ds = ImageDataset(list(r.values()), None, build_transform((64, 64), (0.5,) * 3, (0.5,) * 3))
        n = sum(len(x) for x, _, _ in DataLoader(ds, batch_size=2, num_workers=2, worker_init_fn=worker_init))
        print("LOADED", n)
    """))
    done = _run_script(script, timeout=120)
    assert "LOADED 4" in done.stdout, done.stderr[-2000:]


def test_cli_one_line_for_a_latin1_labels_file(tmp_path, capsys):
    Embeddings(["a.png", "b.png"], np.eye(2, dtype=np.float32), "m").save(tmp_path / "e.npz")
    (tmp_path / "l.csv").write_bytes("filename,ground_truth\na.png,Jos\u00e9\n".encode("latin-1"))
    with pytest.raises(SystemExit):
        cli.main(["score", "--embeddings", str(tmp_path / "e.npz"), "--labels", str(tmp_path / "l.csv")])
    err = _one_error_line(capsys)
    assert "not UTF-8" in err and "line 2" in err


def test_tiny_cmyk_sixteen_bit_and_rotated_images_are_prepared(tmp_path):
    from PIL import Image

    one = np.zeros((1, 1, 4), np.uint8)
    one[..., 3] = 255
    cv2.imwrite(str(tmp_path / "one.png"), one)  # decodes to 1 x 1
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    rgba16 = np.zeros((30, 40, 4), np.uint16)
    rgba16[..., 2] = 60000  # BGR order: red
    rgba16[5:25, 5:35, 3] = 65535
    cv2.imwrite(str(tmp_path / "rgba16.png"), rgba16)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    Image.new("RGB", (60, 20), (200, 10, 10)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    names = ["one.png", "cmyk.jpg", "rgba16.png", "rot.jpg"]
    r = prepare_images([tmp_path / n for n in names], tmp_path / "c", size=64, workers=0, progress=False)
    got = {n: load_prepared(r[n]) for n in names}
    assert got["one.png"].shape == (1, 1, 3)
    assert got["cmyk.jpg"][15, 20, 0] > 200 and got["cmyk.jpg"][15, 20, 1:].max() < 40
    assert got["rgba16.png"].shape == (22, 34, 3) and got["rgba16.png"][10, 10, 0] > 200  # cropped to the mask
    assert got["rot.jpg"].shape == (60, 20, 3)  # upright, as a photo viewer shows it


_EMBED_SCRIPT = """
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from conftest import TINY_OVERRIDES
from jaguar_kit.config import Config, apply_overrides
from jaguar_kit.embed import embed_images
from jaguar_kit.models import build_model
torch.manual_seed(0)
model = build_model(apply_overrides(Config(), list(TINY_OVERRIDES)).model).eval()
paths = {paths!r}
r = embed_images(model, [p.rsplit("/", 1)[1] for p in paths], paths, sys.argv[1], torch.device("cpu"), tta="none",
                 chunk_size=4, batch_size=4, progress=False)
np.save(sys.argv[2], r.embeddings)
"""


def test_two_embedders_on_one_cache_both_finish(prepared, tmp_path):
    """The first is frozen mid-write (SIGSTOP at its first chunk write); the second runs to the
    end on the same cache; the first then resumes. Before, the second deleted the first one's
    temporary file and the first died with a FileNotFoundError traceback."""
    names, paths = prepared
    script = tmp_path / "embed.py"
    script.write_text(_EMBED_SCRIPT.format(tests=str(Path(__file__).parent), paths=[str(p) for p in paths]))
    cache = tmp_path / "cache"
    first = subprocess.Popen([PYTHON, str(script), str(cache), str(tmp_path / "a.npy")],
                             env=cli_env(JAGUAR_KIT_FAULT="chunk-write:1:SIGSTOP"), stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until it stops inside its first chunk write
            state = Path(f"/proc/{first.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "T":
                break
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        assert list(cache.glob(".*.tmp-*")), "the first embedder is not mid-write"
        second = subprocess.run([PYTHON, str(script), str(cache), str(tmp_path / "b.npy")], env=cli_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert not list(cache.glob(".*.tmp-*"))
