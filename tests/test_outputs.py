"""Output paths never lose a user's files: refusals before any work, markers, atomic replacement."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from minitron.cli import main
from minitron.outputs import MARKER, check_output_dir, read_marker, write_output_dir
from tests.helpers import save_checkpoint

FAST = ["--num-samples", "4", "--seq-len", "64", "--no-progress"]


def digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (or of ``root`` itself if it is a file)."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny local checkpoint (a test that fails must never touch the package's own files)."""
    return save_checkpoint(tmp_path / "models" / "tiny")


def test_prune_refuses_input_model_its_parent_and_inside(model_dir, capsys):
    before = digest(model_dir.parent)
    for out, word in ((model_dir, "is the input"), (model_dir.parent, "contains the input"),
                      (model_dir / "pruned", "lies inside the input")):
        assert main(["prune", "--model", str(model_dir), "--out", str(out), *FAST]) == 2
        assert word in capsys.readouterr().err
    assert digest(model_dir.parent) == before  # nothing deleted, nothing added


def test_prune_refuses_foreign_dir_file_and_cwd(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my thesis")
    assert main(["prune", "--out", str(mine), *FAST]) == 2
    assert "not empty and was not written by `minitron prune`" in capsys.readouterr().err
    assert digest(mine) == {"notes.txt": hashlib.sha256(b"my thesis").hexdigest()}

    a_file = tmp_path / "report.pdf"
    a_file.write_bytes(b"%PDF")
    assert main(["prune", "--out", str(a_file), *FAST]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert a_file.read_bytes() == b"%PDF"

    monkeypatch.chdir(mine)
    assert main(["prune", "--out", ".", *FAST]) == 2
    assert "current directory" in capsys.readouterr().err
    assert main(["prune", "--out", "..", *FAST]) == 2
    assert (mine / "notes.txt").read_text() == "my thesis"


def test_save_scores_never_overwrites_model_files_or_lands_in_out(model_dir, tmp_path, capsys):
    before = digest(model_dir)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model_dir), "--out", str(out),
                 "--save-scores", str(model_dir / "model.safetensors"), *FAST]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"not scores")
    assert main(["prune", "--model", str(model_dir), "--out", str(out), "--save-scores", str(other), *FAST]) == 2
    assert "was not written by minitron" in capsys.readouterr().err
    assert main(["prune", "--model", str(model_dir), "--out", str(out),
                 "--save-scores", str(out / "s.safetensors"), *FAST]) == 2
    assert "lies inside --out" in capsys.readouterr().err
    assert digest(model_dir) == before and other.read_bytes() == b"not scores" and not out.exists()


def test_impossible_and_read_only_outputs_fail_before_calibration(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["prune", "--out", str(blocker / "sub"), *FAST]) == 2
    assert "cannot be created" in capsys.readouterr().err
    if Path("/proc/self").is_dir():  # not writable even for root
        assert main(["prune", "--out", "/proc/self/minitron-out", *FAST]) == 2
        assert "not writable" in capsys.readouterr().err
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert main(["prune", "--out", str(ro / "out"), *FAST]) == 2
            assert "not writable" in capsys.readouterr().err
        finally:
            ro.chmod(0o755)


def test_prune_replaces_own_output_and_keeps_foreign_files(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"

    def args(layers: int) -> list[str]:
        return ["prune", "--model", str(model_dir), "--method", "random", "--layers", str(layers), "--out", str(out),
                *FAST]

    assert main(args(3)) == 0
    assert read_marker(out)["kind"] == "prune" and "model.safetensors" in read_marker(out)["files"]
    assert main(args(2)) == 0  # a previous output of `minitron prune`: replaced
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    (out / "notes.txt").write_text("mine")
    assert main(args(3)) == 2  # it now holds a file minitron did not write
    assert "notes.txt" in capsys.readouterr().err
    assert main([*args(3), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".minitron-")]  # no temp dirs left

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    assert main(["prune", "--model", str(model_dir), "--method", "random", "--layers", "3", "--out", str(foreign),
                 "--overwrite", *FAST]) == 0
    assert (foreign / "keep.txt").read_text() == "keep" and (foreign / "model.safetensors").is_file()


def test_failed_write_keeps_previous_output_and_stale_temps_are_cleaned(tmp_path):
    """A crashed writer's temp folder goes only as far as its marker proves its files; one without (a write
    interrupted before its marker, or a user's folder of that name) stays, named in a warning."""
    from minitron.owned import digest_tree, write_marker

    out = tmp_path / "o"
    write_output_dir(out, "prune", lambda d: (d / "a.txt").write_text("v1"))
    stale = tmp_path / ".minitron-tmp-o-999999999"  # a crashed writer's temp dir (no such pid), no marker yet
    stale.mkdir()
    (stale / ".minitron-partial").touch()
    (stale / "big.bin").write_bytes(b"0" * 1000)
    proven = tmp_path / ".minitron-old-o-999999998.0123abcd"  # a crash after its marker: every file recorded
    proven.mkdir()
    (proven / "model.bin").write_bytes(b"1" * 1000)
    write_marker(proven, "prune", digest_tree(proven))

    def crash(d: Path) -> None:
        (d / "a.txt").write_text("v2")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError), pytest.warns(UserWarning, match="no marker proves all its files"):
        write_output_dir(out, "prune", crash)
    assert (out / "a.txt").read_text() == "v1"
    # the proven stale dir and the failed write's own temp dir are gone; the unproven one is kept, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "o"]
    assert (stale / "big.bin").read_bytes() == b"0" * 1000
    stale.rename(tmp_path / "moved-away")  # the user decides; then the next write's folder is clean
    (tmp_path / "moved-away" / "big.bin").unlink()
    (tmp_path / "moved-away" / ".minitron-partial").unlink()
    (tmp_path / "moved-away").rmdir()
    write_output_dir(out, "prune", lambda d: (d / "b.txt").write_text("v3"))
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]  # the old output replaced as a whole


def test_search_refuses_unsafe_outputs(model_dir, tmp_path, capsys):
    from minitron.arch_search import SearchConfig, search
    from tests.helpers import make_model

    assert main(["search", "--model", str(model_dir), "--out", str(model_dir.parent), "--no-progress"]) == 2
    assert "contains the input" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2")
    ids = torch.randint(0, 101, (8, 16))
    with pytest.raises(ValueError, match="not empty and was not written by `minitron search`.*overwrite=True"):
        search(make_model("llama"), ids, ids, params=0.8, output_dir=mine, config=SearchConfig(seq_len=16),
               progress=False)
    assert digest(mine) == {"data.csv": hashlib.sha256(b"1,2").hexdigest()}


def test_check_output_dir_accepts_new_empty_and_own_kind(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper", "prune")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "prune")
    write_output_dir(tmp_path / "p", "prune", lambda d: (d / "x").write_text("1"))
    check_output_dir(tmp_path / "p", "prune")
    with pytest.raises(ValueError, match="holds a `minitron prune` output, not a `minitron search` one"):
        check_output_dir(tmp_path / "p", "search")


# ---- markers prove ownership by hash; no symlink is followed -------------------------------------------


def test_forged_or_copied_marker_never_makes_a_user_folder_minitrons(model_dir, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    (d / MARKER).write_text('{"kind": "prune", "files": ["notes.txt"]}')  # forged: names, no hashes
    prune = ["prune", "--model", str(model_dir), "--method", "random", "--layers", "3", *FAST]
    assert main([*prune, "--out", str(d)]) == 2
    assert "records no file hashes" in capsys.readouterr().err
    (d / MARKER).write_text('{"kind": "prune", "files": null}')
    assert main([*prune, "--out", str(d)]) == 2  # refused up front, not "changed while the run was working"
    assert "records no file hashes" in capsys.readouterr().err
    other = tmp_path / "other"
    write_output_dir(other, "prune", lambda t: (t / "notes.txt").write_text("minitron's"))
    (d / MARKER).write_bytes((other / MARKER).read_bytes())  # a real marker, copied: its hash is not notes.txt's
    assert main([*prune, "--out", str(d)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (d / "notes.txt").read_text() == "precious"


def test_marker_through_a_symlinked_folder_never_deletes_outside(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "victim.txt").write_text("outside --out")
    d = tmp_path / "d"
    write_output_dir(d, "prune", lambda t: ((t / "ext").mkdir(), (t / "ext" / "victim.txt").write_text("x")))
    marker = read_marker(d)
    import shutil

    shutil.rmtree(d / "ext")
    (d / "ext").symlink_to(victim)
    (d / MARKER).write_text(__import__("json").dumps(marker))  # its hash is even right for the content "x"...
    (victim / "victim.txt").write_text("x")  # ...and the file behind the link has that content
    write_output_dir(d, "prune", lambda t: (t / "model.bin").write_text("new"), overwrite=True)
    assert (victim / "victim.txt").read_text() == "x" and (d / "model.bin").read_text() == "new"
    with pytest.raises(ValueError, match="ext"):  # without --overwrite: the link is not minitron's
        check_output_dir(d, "prune")


def test_symlinked_lock_or_marker_is_refused_before_work(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    r = tmp_path / "r"
    r.mkdir()
    (r / ".minitron.lock").symlink_to(victim)
    for kind in ("distill", "prune", "search"):
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=r"\.minitron\.lock is a symbolic link"):
                check_output_dir(r, kind, overwrite=overwrite)
    from minitron.runlock import acquire

    with pytest.raises(ValueError, match="symbolic link"):
        acquire(r)
    assert victim.read_text() == "precious"
    (r / ".minitron.lock").unlink()
    (r / MARKER).symlink_to(victim)
    with pytest.raises(ValueError, match="is a symbolic link"):
        check_output_dir(r, "distill")
    assert victim.read_text() == "precious"


def test_search_overwrite_keeps_a_users_best_folder_and_never_writes_through_a_link(tmp_path):
    from minitron.arch_search import SearchConfig, search
    from tests.helpers import make_model

    ids = torch.randint(0, 101, (400,), generator=torch.Generator().manual_seed(0))
    cfg = SearchConfig(tolerance=0.1, retrain_steps=1, top=1, divisors={"intermediate_size": 8}, axes=("ffn",),
                       seq_len=16)
    out, outside = tmp_path / "s", tmp_path / "outside.csv"
    out.mkdir()
    outside.write_text("my table")
    (out / "candidates.csv").symlink_to(outside)
    with pytest.raises(ValueError, match=r"candidates\.csv is a symbolic link"):
        search(make_model("llama"), ids, ids, params=0.85, output_dir=out, overwrite=True, config=cfg, progress=False)
    (out / "candidates.csv").unlink()
    (out / "best").mkdir()
    (out / "best" / "notes.txt").write_text("mine")
    (out / "best" / "config.json").write_text("{}")
    res = search(make_model("llama"), ids, ids, params=0.85, output_dir=out, overwrite=True, config=cfg,
                 progress=False)
    assert (out / "best" / "notes.txt").read_text() == "mine" and outside.read_text() == "my table"
    assert AutoModelForCausalLM.from_pretrained(out / "best").config.intermediate_size == res.best.intermediate_size
    with pytest.raises(ValueError, match=r"holds best/notes\.txt, which minitron did not write"):
        search(make_model("llama"), ids, ids, params=0.85, output_dir=out, config=cfg, progress=False)
    (out / "best" / "notes.txt").unlink()
    again = search(make_model("llama"), ids, ids, params=0.85, output_dir=out, config=cfg, progress=False)
    assert again.best.name == res.best.name  # only its own files there: replaced without overwrite...
    (out / "runs" / "mine").mkdir()
    (out / "runs" / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds runs/mine/notes\.txt, which is not part of a minitron"):
        search(make_model("llama"), ids, ids, params=0.85, output_dir=out, overwrite=True, config=cfg, progress=False)
    (out / "runs" / "mine" / "notes.txt").unlink()
    (out / "candidates.md").write_text("edited by hand")
    with pytest.raises(ValueError, match=r"holds candidates\.md, which minitron did not write"):
        search(make_model("llama"), ids, ids, params=0.85, output_dir=out, config=cfg, progress=False)


def test_starting_over_keeps_a_final_folder_whose_files_were_edited(tmp_path):
    """``final/`` is never read back: once a file in it no longer has the content minitron wrote, it is
    the user's, and starting the run over must not delete the folder."""
    from minitron.distillation.run_dir import drop_weights
    from minitron.outputs import write_output_dir
    from minitron.owned import owned_dir

    final = tmp_path / "final"
    write_output_dir(final, "final", lambda tmp: (tmp / "config.json").write_text("{}"), overwrite=True)
    assert owned_dir(final)
    drop_weights(tmp_path)
    assert not final.exists()  # minitron's own, unedited: removed

    write_output_dir(final, "final", lambda tmp: (tmp / "config.json").write_text("{}"), overwrite=True)
    (final / "config.json").write_text('{"edited by": "the user"}')
    drop_weights(tmp_path)
    assert (final / "config.json").read_text() == '{"edited by": "the user"}'


def test_a_forged_marker_never_deletes_a_users_files(tmp_path):
    """Trimming old checkpoints and starting over delete only files whose recorded hash still matches: a
    folder named like a checkpoint, with a marker listing the user's files under made-up hashes, is kept."""
    import json

    from minitron.distillation.checkpoint import CKPT_DIR
    from minitron.distillation.run_dir import drop_weights
    from minitron.owned import MARKER, remove_owned_dir, seal

    forged = tmp_path / CKPT_DIR / "step_000001"
    (forged / "student").mkdir(parents=True)
    (forged / "student" / "thesis.tex").write_text("years of work")
    (forged / "notes.txt").write_text("mine")
    (forged / MARKER).write_text(json.dumps({"kind": "checkpoint", "files": {
        "student/thesis.tex": "0" * 64, "notes.txt": "1" * 64}}))
    drop_weights(tmp_path)
    assert (forged / "student" / "thesis.tex").read_text() == "years of work"
    assert (forged / "notes.txt").read_text() == "mine"

    # a real checkpoint with one file edited afterwards: minitron's files go, the edited one stays
    real = tmp_path / "real"
    (real / "student").mkdir(parents=True)
    (real / "student" / "model.safetensors").write_bytes(b"weights")
    (real / "trainer_state.pt").write_bytes(b"state")
    seal(real, "checkpoint")
    (real / "trainer_state.pt").write_bytes(b"edited")
    assert remove_owned_dir(real) is False
    assert not (real / "student" / "model.safetensors").exists()
    assert (real / "trainer_state.pt").read_bytes() == b"edited" and (real / MARKER).exists()
    (real / "trainer_state.pt").unlink()
    assert remove_owned_dir(real) is True and not real.exists()


def test_a_symlink_inside_a_checkpoint_is_never_followed(tmp_path):
    from minitron.owned import remove_owned_dir, seal

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    ckpt = tmp_path / "step_000001"
    ckpt.mkdir()
    (ckpt / "a.bin").write_bytes(b"a")
    seal(ckpt, "checkpoint")
    (ckpt / "link").symlink_to(outside, target_is_directory=True)
    assert remove_owned_dir(ckpt) is False
    assert (outside / "keep.txt").read_text() == "keep" and (ckpt / "link").is_symlink()


def test_temp_names_never_reuse_an_existing_entry(tmp_path):
    """A folder or file already named like this process's temp entries (a user's, or one a crash left) is
    neither emptied, reused nor overwritten by an atomic write: every temp name is new."""
    from minitron.atomic import atomic_write_dir, atomic_write_text, clean_stale_temps

    pid = os.getpid()
    squatters = [tmp_path / f".minitron-tmp-o-{pid}", tmp_path / f".minitron-old-o-{pid}",
                 tmp_path / f".minitron-tmp-c-{pid}", tmp_path / f".minitron-old-c-{pid}"]
    for d in squatters:
        d.mkdir()
        (d / "mine.txt").write_text("user data")
    user_file = tmp_path / f".f.txt.tmp-{pid}"
    user_file.write_text("user file")
    before = digest(tmp_path)

    out = tmp_path / "o"
    write_output_dir(out, "prune", lambda d: (d / "a.txt").write_text("v1"))
    write_output_dir(out, "prune", lambda d: (d / "a.txt").write_text("v2"))  # swaps via a trash folder
    atomic_write_dir(tmp_path / "c", lambda d: (d / "x").write_text("1"))
    atomic_write_dir(tmp_path / "c", lambda d: (d / "x").write_text("2"))  # moves the old one aside
    atomic_write_text(tmp_path / "f.txt", "text")
    assert (out / "a.txt").read_text() == "v2" and (tmp_path / "c" / "x").read_text() == "2"
    assert {k: v for k, v in digest(tmp_path).items() if k in before} == before  # every squatter kept as it was
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["o", "c", "f.txt", user_file.name, *(d.name for d in squatters)])  # no temp left over
    # a crash of a writer of this version leaves `<name>-<pid>.<random>`: recognised, and cleaned as far as its
    # marker proves (here: every file)
    from minitron.owned import digest_tree, remove_owned_dir, write_marker

    stale = tmp_path / ".minitron-tmp-o-999999999.0123abcd"
    stale.mkdir()
    (stale / "model.bin").write_text("weights")
    write_marker(stale, "prune", digest_tree(stale))
    assert clean_stale_temps(tmp_path, "o", remove_proven=remove_owned_dir) == [stale] and not stale.exists()
    assert all(d.is_dir() for d in squatters)  # this process's pid is alive: its names are never cleaned
