"""Issue 12, the data and inference half: nothing lost, nothing silently wrong.

Caches keyed by content, prepared images verified, the manifest kept across kills, one CSV
reader, the Python API that never hangs, one-line errors (also from loader workers), and
path-like file names. Each test reproduces a case that went wrong before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO, TINY_OVERRIDES, cli_env, run_cli
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
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(JaguarKitError, match=r"a\.png.*(truncated|damaged|corrupt)") as e:
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
    for name, ident, path in comp.train.itertuples(index=False):
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
