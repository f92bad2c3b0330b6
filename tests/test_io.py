"""sparsegrad.io: atomic files and folders, ownership markers, locks, pre-flight checks, strict JSON.

The crash cases (a real process SIGKILLed at each step of a folder swap) are in test_adversarial_core.py."""

import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
import time

import pytest

import sparsegrad.io as sio
from sparsegrad.io import files, folders, recovery, swap
from sparsegrad.io import (
    FolderLockedError, NotOursError, NotWritableError, PathRelationError, SafetyError, WriteFailed,
    atomic_directory, atomic_write_bytes, atomic_write_json, check_output_path, check_separate, check_writable,
    foreign_entries, is_ours, lock_folder, make_owned_dir, mark_ours, read_marker, record_ours, recover_leftovers,
    remove_ours, strict_json,
)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "sub" / "adapter"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and not final.exists()
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(final) as tmp:
            (tmp / "b.txt").write_text("two")
            raise RuntimeError("died half-way")
    assert names(final) == ["a.txt"]  # untouched

    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("two")
    assert names(final) == ["b.txt"]  # replaced, not merged; no marker left without owner=
    assert names(final.parent) == ["adapter"]  # no temporary or old folders left


def test_swap_uses_rename_exchange_where_the_file_system_has_it(tmp_path, monkeypatch):
    if not sio.exchange_supported(tmp_path):
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE)")
    calls = []
    real = swap.renameat2
    monkeypatch.setattr(swap, "renameat2", lambda a, b, f: calls.append(f) or real(a, b, f))
    monkeypatch.setattr(os, "rename", lambda *a: pytest.fail(f"plain rename {a} over an existing folder"))
    (tmp_path / "out").mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("new")
    assert calls == [sio.RENAME_EXCHANGE] and names(tmp_path) == ["out"]


def test_fallback_without_exchange_still_replaces_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv(sio.NO_EXCHANGE_ENV, "1")
    for text in ("old", "new"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text(text)
    assert (tmp_path / "out" / "x").read_text() == "new" and names(tmp_path) == ["out"]


def test_every_rename_is_followed_by_an_fsync_of_its_folder(tmp_path, monkeypatch):
    events = []
    real_replace, real_fsync_dir, real_x = os.replace, sio.fsync_dir, swap.renameat2
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(b))) or real_replace(a, b))
    monkeypatch.setattr(swap, "renameat2", lambda a, b, f: events.append(("rename", str(b))) or real_x(a, b, f))
    for module in (files, folders, recovery, swap):  # every module of the package that renames or fsyncs
        monkeypatch.setattr(module, "fsync_dir", lambda d: events.append(("fsync", str(d))) or real_fsync_dir(d))
    atomic_write_bytes(tmp_path / "f.bin", b"1")
    (tmp_path / "out").mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        atomic_write_bytes(tmp / "a", b"2")
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) >= 3
    for i in renames:
        target = events[i][1]
        assert ("fsync", os.path.dirname(target)) in events[i + 1:], (target, events)


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                      (0o002, 0o664, 0o775)])
def test_files_and_folders_respect_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "m.json", b"{}")
        with atomic_directory(tmp_path / "merged", owner="merged") as tmp:
            atomic_write_bytes(tmp / "model.safetensors", b"x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "m.json") == file_mode
    assert mode(tmp_path / "merged" / "model.safetensors") == file_mode
    assert mode(tmp_path / "merged" / sio.MARKER_NAME) == file_mode
    assert mode(tmp_path / "merged") == dir_mode


def test_strict_json_writes_null_for_nan_and_inf(tmp_path):
    import torch

    data = {"eval_loss": float("nan"), "best": float("inf"), "hist": [1.5, float("-inf")],
            "t": torch.tensor([1.0, float("nan")]), "ok": 2, "path": tmp_path}
    atomic_write_json(tmp_path / "metrics.json", data)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert parsed == {"eval_loss": None, "best": None, "hist": [1.5, None], "t": [1.0, None], "ok": 2,
                      "path": str(tmp_path)}
    assert strict_json(float("nan")) == "null"


def test_disk_full_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "loss.csv"
    atomic_write_bytes(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteFailed) as info:
        atomic_write_bytes(target, b"new" * 1000)
    message = str(info.value)
    assert "\n" not in message and str(target) in message and "the disk is full" in message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_bytes() == b"old" and names(tmp_path) == ["loss.csv"]


def test_read_only_inside_a_folder_write_is_one_line_and_keeps_the_old_folder(tmp_path):
    final = tmp_path / "adapter"
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(WriteFailed, match=r"cannot write .*adapter: the file system is read-only"):
        with atomic_directory(final) as tmp:
            raise OSError(errno.EROFS, "Read-only file system", str(tmp / "b"))
    assert names(final) == ["a"] and names(tmp_path) == ["adapter"]


def test_ownership_marker_and_remove_ours(tmp_path):
    run = tmp_path / "run"
    assert make_owned_dir(run, "run") and not make_owned_dir(run, "run")
    assert is_ours(run) and is_ours(run, "run") and not is_ours(run, "merged")
    with atomic_directory(run / "adapter", owner="adapter") as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w").write_text("w")
    assert read_marker(run / "adapter")["files"] == ["adapter_config.json", "sub", "sub/w"]
    atomic_write_bytes(run / "loss.csv", b"1")
    record_ours(run, "loss.csv")
    assert foreign_entries(run) == []

    (run / "adapter" / "NOTES.txt").write_text("mine")
    (run / "mine.bin").write_text("mine")
    with pytest.raises(NotOursError, match=r"holds files sparsegrad did not write \(adapter/NOTES.txt, mine.bin\)"):
        remove_ours(run)
    assert (run / "adapter" / "NOTES.txt").exists() and (run / "loss.csv").exists()  # nothing deleted
    (run / "mine.bin").unlink()
    (run / "adapter" / "NOTES.txt").unlink()
    remove_ours(run)
    assert not run.exists()

    user = tmp_path / "user"
    user.mkdir()
    (user / "f").write_text("f")
    with pytest.raises(NotOursError, match="no sparsegrad marker"):
        remove_ours(user)
    assert not make_owned_dir(user, "run") and not is_ours(user)  # existing folders are not claimed
    with pytest.raises(NotOursError):
        record_ours(user, "f")


def test_remove_ours_never_follows_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("p")
    owned = tmp_path / "owned"
    owned.mkdir()
    (owned / "link").symlink_to(outside)
    mark_ours(owned, "checkpoint")  # lists the link as a file of ours
    remove_ours(owned)
    assert not owned.exists() and (outside / "precious").read_text() == "p"
    with pytest.raises(NotOursError, match="not a folder"):
        (tmp_path / "l2").symlink_to(outside)
        remove_ours(tmp_path / "l2")


def test_atomic_directory_with_owner_refuses_to_replace_what_is_not_ours(tmp_path):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "NOTES.txt").write_text("mine")
    with pytest.raises(NotOursError, match="sparsegrad did not write it as a 'merged' folder"):
        with atomic_directory(merged, owner="merged") as tmp:
            pytest.fail("must refuse before yielding")
    assert names(merged) == ["NOTES.txt"] and names(tmp_path) == ["merged"]
    (merged / "NOTES.txt").unlink()
    with atomic_directory(merged, owner="merged") as tmp:  # an empty folder may be replaced
        (tmp / "model.safetensors").write_text("1")
    (merged / "NOTES.txt").write_text("mine")
    with pytest.raises(NotOursError, match=r"holds files sparsegrad did not write \(NOTES.txt\)"):
        with atomic_directory(merged, owner="merged"):
            pass
    (merged / "NOTES.txt").unlink()
    with atomic_directory(merged, owner="merged") as tmp:  # ours: replaced
        (tmp / "model.safetensors").write_text("2")
    assert (merged / "model.safetensors").read_text() == "2"
    assert names(merged) == [sio.MARKER_NAME, "model.safetensors"]
    with pytest.raises(NotOursError, match="did not write it as a 'adapter' folder"):
        with atomic_directory(merged, owner="adapter"):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotOursError, match="is not a folder"):
        with atomic_directory(tmp_path / "file"):
            pass


def test_lock_refuses_a_second_writer_naming_its_pid(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from sparsegrad.io import lock_folder; lock_folder(sys.argv[1]); print('locked', "
        "flush=True); time.sleep(60)"), str(out)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError) as info:
            lock_folder(out)
        assert f"(PID {holder.pid})" in str(info.value) and "\n" not in str(info.value)
        holder.kill()  # the kernel drops a dead holder's flock: the stale file is taken over
        holder.wait()
        assert (out / sio.LOCK_NAME).read_text().strip() == str(holder.pid)
        with lock_folder(out) as lock:
            assert (out / sio.LOCK_NAME).read_text().strip() == str(os.getpid())
            with pytest.raises(FolderLockedError, match=f"PID {os.getpid()}"):
                lock_folder(out)  # a second writer in this very process too
        assert lock.fd is None and names(out) == []  # released and removed
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    (tmp_path / sio.LOCK_NAME).write_text(f"{dead_pid()}\n")
    lock = lock_folder(tmp_path)
    assert (tmp_path / sio.LOCK_NAME).read_text().strip() == str(os.getpid())
    lock.release()


def test_preflight_writable_and_free_space(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "deeper", "--output-dir")  # nearest existing parent is writable
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotWritableError, match=r"--output-dir .*afile/x: .*afile is a file, not a folder"):
        check_writable(tmp_path / "afile" / "x", "--output-dir")
    with pytest.raises(NotWritableError, match=r"about 1048576.0 MiB needed, .* MiB free"):
        check_writable(tmp_path, "--output-dir", need_bytes=2**40)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(NotWritableError, match="cannot be written: the file system is read-only"):
        check_writable(tmp_path, "--output-dir")


def test_output_path_and_relations(tmp_path, monkeypatch):
    for raw in ("", "  "):
        with pytest.raises(SafetyError, match="--output-dir is empty"):
            check_output_path(raw, "--output-dir")
    monkeypatch.chdir(tmp_path)
    assert str(check_output_path(".", "--output-dir")) == "."  # writing into it is fine; replacing it is not
    for raw in (".", "..", "/", str(tmp_path)):
        with pytest.raises(PathRelationError, match="replaced whole"):
            check_output_path(raw, "--output", replaced_whole=True)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (tmp_path / "link").symlink_to(run)
    cases = [(run, "contains"), (run / "adapter", "is"), (run / "adapter" / "m", "lies inside"),
             (tmp_path / "link", "contains")]
    for out, relation in cases:
        with pytest.raises(PathRelationError, match=f" {relation} --adapter"):
            check_separate(out, "--output", {"--adapter": run / "adapter", "--model": None})
    check_separate(tmp_path / "merged", "--output", {"--adapter": run / "adapter"})


def test_recover_leftovers_only_touches_what_it_can_prove(tmp_path):
    dead = dead_pid()
    (tmp_path / f".loss.csv.sg{dead}-abc123.tmp").write_text("half")
    (tmp_path / f".metrics.json.sg{os.getpid()}-live.tmp").write_text("in progress")  # a live writer
    (tmp_path / ".adapter.tmp-userdir").mkdir()  # no marker: not provably ours
    (tmp_path / ".loss.csv.tmp").write_text("some other tool's")
    actions = recover_leftovers(tmp_path)
    assert len(actions) == 1 and "killed writer" in actions[0]
    assert names(tmp_path) == [".adapter.tmp-userdir", ".loss.csv.tmp", f".metrics.json.sg{os.getpid()}-live.tmp"]


def test_checksums_in_the_marker_catch_edits_of_any_file(tmp_path):
    """For folders whose files have no checksum of their own (a LoRA adapter, task.json, a merged model)."""
    from sparsegrad.io import EditedError, verify_ours

    with atomic_directory(tmp_path / "adapter", owner="adapter", checksums=True) as tmp:
        (tmp / "task.json").write_text('{"label_names": ["a", "b"]}')
        (tmp / "adapter_model.safetensors").write_bytes(b"w" * 3000000)  # several read blocks
    folder = tmp_path / "adapter"
    verify_ours(folder)
    atomic_write_bytes(folder / "loss.csv", b"1")
    (folder / "task.json").write_text('{"label_names": ["b", "a"]}')
    record_ours(folder, "loss.csv")  # adding a file does not bless the edit of another
    with pytest.raises(EditedError, match=r"task.json was edited or replaced after sparsegrad wrote it"):
        verify_ours(folder)
    verify_ours(folder, ["adapter_model.safetensors", "loss.csv"])
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(EditedError, match="adapter_model.safetensors is missing"):
        verify_ours(folder, ["adapter_model.safetensors"])
    with pytest.raises(EditedError, match="not among the files"):
        verify_ours(folder, ["other.bin"])
    mark_ours(tmp_path, "run")
    with pytest.raises(NotOursError, match="holds no sparsegrad checksums"):
        verify_ours(tmp_path)


def test_prepare_output_folder_runs_the_whole_preflight(tmp_path):
    from sparsegrad.io import prepare_output_folder

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    with pytest.raises(PathRelationError, match="--output-dir .* contains --adapter"):
        prepare_output_folder(tmp_path / "run", "--output-dir", inputs={"--adapter": adapter})
    with pytest.raises(SafetyError, match="is empty"):
        prepare_output_folder("", "--output-dir")
    out = tmp_path / "new"
    (tmp_path / f".new.sg{dead_pid()}-x.tmp").write_text("a leftover beside, not inside: kept")
    with prepare_output_folder(out, "--output-dir", inputs={"--adapter": adapter}) as lock:
        assert lock.created and is_ours(out, "run") and lock.recovered == []
        with pytest.raises(FolderLockedError, match=f"--output-dir {out} is in use .*PID {os.getpid()}"):
            prepare_output_folder(out, "--output-dir")
    remove_ours(out)  # a failed run's folder that holds nothing else
    assert not out.exists()
    (out / "checkpoints").mkdir(parents=True)  # an existing folder is used, not claimed
    (out / f".loss.csv.sg{dead_pid()}-y.tmp").write_text("half")
    with prepare_output_folder(out, "--output-dir") as lock:
        assert not lock.created and not is_ours(out) and len(lock.recovered) == 1
    assert names(out) == ["checkpoints"]


def test_a_disk_error_inside_a_folder_write_names_the_file_by_its_final_place(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteFailed) as info:
        with atomic_directory(tmp_path / "adapter") as tmp:
            monkeypatch.setattr(os, "fsync", full)
            atomic_write_bytes(tmp / "adapter_model.safetensors", b"w")
    monkeypatch.undo()
    assert str(info.value).startswith(f"cannot write {tmp_path / 'adapter' / 'adapter_model.safetensors'}: the disk")
    assert list(tmp_path.iterdir()) == []
