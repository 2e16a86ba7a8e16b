"""User errors and the files the project writes: one line naming the real path and exit status 2
for every command (tracebacks only for bugs), and the permissions any other program's files get."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mochi_jax import cli
from mochi_jax.checkpoints import files, lora_format, lora_write, orbax_io, safetensors_io
from mochi_jax.lib import cache as cache_lib
from mochi_jax.lib.video import write_mp4
from mochi_jax.models.lora import LoraTarget

ROOT = Path(__file__).resolve().parents[1]


def _tiny_lora():
    """A LoRA tree of a 3-block model of width 8, text width 8: qkv and proj of both streams."""
    rng = np.random.default_rng(0)
    tree, targets = {"blocks": {"attn": {}}, "last_block": {"attn": {}}}, []
    for name, (d_in, d_out) in {"qkv_x": (8, 24), "qkv_y": (8, 24), "proj_x": (8, 8), "proj_y": (8, 8)}.items():
        tree["blocks"]["attn"][name] = {"a": rng.standard_normal((2, d_in, 2)), "b": rng.standard_normal((2, 2, d_out))}
        if name != "proj_y":
            tree["last_block"]["attn"][name] = {"a": rng.standard_normal((d_in, 2)),
                                                "b": rng.standard_normal((2, d_out))}
        targets.append(LoraTarget(f"attn/{name}$", 2, 2.0))
    return tree, tuple(targets)


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    try:
        yield 0o664
    finally:
        os.umask(old)


def test_files_get_the_permissions_of_the_umask(tmp_path, umask_002):
    """safetensors >= 0.8 writes its files 0600 through a private temporary file: a ComfyUI or a
    sampling service running as another user could not read our LoRAs and caches. Every file the
    project writes must get what any program's new file gets (0o666 minus the umask)."""
    tree, targets = _tiny_lora()
    written = [lora_write.save_genmo(tmp_path / "lora.safetensors", tree, targets),
               lora_write.save_diffusers(tmp_path / "lora_diffusers.safetensors", tree, targets),
               cache_lib.write_arrays(tmp_path / "cache" / "clips" / "a.safetensors", {"mean": np.ones(3, np.float32)}),
               cache_lib.write_manifest(tmp_path / "cache", {"format": cache_lib.FORMAT}),
               write_mp4(tmp_path / "video.mp4", np.zeros((3, 16, 16, 3), np.uint8))]
    orbax_io.save_model(tmp_path / "ckpt", {"w": {"kernel": np.ones((4, 4), np.float32)}}, "test", {})
    written += [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
    assert len(written) > 6
    for p in written:
        assert oct(p.stat().st_mode & 0o777) == oct(umask_002), p
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    np.testing.assert_array_equal(load_file(written[2])["mean"], np.ones(3, np.float32))


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write into, even root: a read-only tmpfs where mounting is allowed, else
    (not root) a chmod 555 folder; skipped where neither can be had."""
    d = tmp_path / "ro"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    if not mounted:
        d.chmod(0o555)
    try:
        probe = d / "probe"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            pytest.skip("no read-only folder can be made here")
        except OSError:
            pass
        yield d
    finally:
        if mounted:
            subprocess.run(["umount", str(d)], check=False)
        d.chmod(0o755)


@pytest.fixture
def full_dir(small_disk):
    return small_disk(64)


def _message(e) -> str:
    return cli.user_error(e)


def test_writers_name_the_real_path_never_a_temporary_file(tmp_path):
    tree, targets = _tiny_lora()
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.safetensors").mkdir()
    cases = [(tmp_path / "file" / "lora.safetensors", NotADirectoryError, tmp_path / "file"),
             (tmp_path / "folder.safetensors", IsADirectoryError, tmp_path / "folder.safetensors")]
    for path, kind, named in cases:
        for write in (lambda p: lora_write.save_diffusers(p, tree, targets),
                      lambda p: cache_lib.write_arrays(p, {"a": np.ones(2)}),
                      lambda p: files.write_atomically(p, "text")):
            with pytest.raises(kind) as e:
                write(path)
            assert e.value.filename == str(named) and ".tmp" not in str(e.value)
            assert _message(e.value).startswith(f"{named}: ")
    with pytest.raises(NotADirectoryError) as e:
        orbax_io.save_model(tmp_path / "file", {"w": np.ones(2)}, "test", {})
    assert e.value.filename == str(tmp_path / "file")
    with pytest.raises(NotADirectoryError) as e:
        files.writable_dir(tmp_path / "file" / "out")
    assert e.value.filename == str(tmp_path / "file")


def test_read_only_and_full_folders_are_named(read_only_dir, tmp_path):
    tree, targets = _tiny_lora()
    for write in (lambda: lora_write.save_genmo(read_only_dir / "lora.safetensors", tree, targets),
                  lambda: cache_lib.write_manifest(read_only_dir, {}),
                  lambda: files.writable_dir(read_only_dir),
                  lambda: orbax_io.save_model(read_only_dir / "ckpt", {"w": np.ones(2)}, "test", {})):
        with pytest.raises(OSError) as e:
            write()
        assert e.value.errno in (errno.EROFS, errno.EACCES)
        assert e.value.filename in (str(read_only_dir), str(read_only_dir / "lora.safetensors"),
                                    str(read_only_dir / "manifest.json"))
        assert ".tmp" not in _message(e.value) and "Traceback" not in _message(e.value)


def test_a_full_disk_is_named(full_dir):
    with pytest.raises(OSError) as e:
        safetensors_io.write_safetensors(full_dir / "big.safetensors", {"a": np.ones(1 << 16, np.float32)})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(full_dir / "big.safetensors")
    assert list(full_dir.iterdir()) == []  # the temporary file is gone
    assert _message(e.value) == f"{full_dir / 'big.safetensors'}: No space left on device"


def test_a_video_cut_short_by_a_full_disk_is_an_error_not_a_file(full_dir):
    """ffmpeg on a full disk leaves a truncated mp4 (no index) and no exit status to read: the write
    is checked, named as a full disk, and nothing is left."""
    frames = np.random.default_rng(0).integers(0, 255, (30, 128, 128, 3), dtype=np.uint8)
    with pytest.raises(OSError) as e:
        write_mp4(full_dir / "clip.mp4", frames)
    assert _message(e.value) == f"{full_dir / 'clip.mp4'}: No space left on device"
    assert list(full_dir.iterdir()) == []


def test_a_checkpoint_cut_short_by_a_full_disk_is_one_error_and_leaves_nothing(full_dir, capfd):
    """What convert_weights.py and lora.py merge write (orbax_io.write): a full disk is one OSError
    naming the checkpoint, orbax's thread tracebacks are not printed, no partial save is left."""
    rng = np.random.default_rng(0)  # incompressible
    params = {"w": rng.standard_normal((64, 1024), np.float32), "v": rng.standard_normal((64, 1024), np.float32)}
    with pytest.raises(OSError) as e:
        orbax_io.save_model(full_dir / "merged", params, "test", {}, progress=False)
    assert _message(e.value) == f"{full_dir / 'merged'}: No space left on device"
    assert list(full_dir.iterdir()) == []
    printed = "".join(capfd.readouterr())
    assert "Traceback" not in printed and "raised an exception" not in printed, printed


def test_user_error_or_bug():
    assert cli.user_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y")) == \
        "/x/y: No such file or directory"
    assert cli.user_error(OSError(errno.EROFS, "Read-only file system", "/mnt/ro")) == "/mnt/ro: Read-only file system"
    assert cli.user_error(lora_format.LoraFormatError("a.safetensors: unknown key")) == "a.safetensors: unknown key"
    assert cli.user_error(ValueError("num_frames=8 is not 6k+1")) == "num_frames=8 is not 6k+1"
    assert cli.user_error(OSError(errno.EIO, "Input/output error")) is None  # a sick disk: keep the traceback
    assert cli.user_error(KeyError("x")) is None and cli.user_error(TypeError("bug")) is None
    with pytest.raises(TypeError):
        cli.fail("cmd", TypeError("a bug shows its traceback"))


def _run(args, cwd):
    """The command as a user on a CPU machine runs it: no JAX_PLATFORMS, so libtpu (installed by the
    test extra) looks for TPU chips, and what it prints must not reach the user."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=dict(env, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)


def test_config_files_presets_and_fields_that_do_not_exist_are_named():
    with pytest.raises(cli.BadFlags, match=r"--config=configs/nope.py: no such config file \(the project's: "
                                           r"configs/aot.py, "):
        cli._load_config("configs/nope.py")
    with pytest.raises(cli.BadFlags, match="unknown preset 'demoo'"):
        cli._load_config(cli.resolve_config("configs/lora.py:demoo"))
    config = cli._load_config(cli.resolve_config("configs/lora.py"))
    cli.check_fields(config, ["train", "--config.optim.lr=1e-4", "--config.lora.qkv.rank=8", "--noconfig.resume"])
    with pytest.raises(cli.BadFlags, match=r"--config.optim.learning_rate: optim has no field 'learning_rate'; "
                                           r"its fields: .*, lr, "):
        cli.check_fields(config, ["train", "--config.optim.learning_rate=1e-4"])
    with pytest.raises(cli.BadFlags, match=r"--config.stpes: the config has no field 'stpes'; did you mean steps\?"):
        cli.check_fields(config, ["train", "--config.stpes=3"])
    with pytest.raises(cli.BadFlags, match="optim.lr is a value, not a block of fields"):
        cli.check_fields(config, ["train", "--config.optim.lr.x=1"])


@pytest.mark.slow
def test_every_command_reports_user_errors_in_one_line_with_status_2(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    f = tmp_path / "a_file"
    cases = [
        (["-m", "mochi_jax.prepare", f"--config.input_dir={tmp_path / 'missing'}"],
         f"mochi_jax.prepare: {tmp_path / 'missing'}: input_dir does not exist"),
        (["-m", "mochi_jax.prepare", f"--config.input_dir={tmp_path / 'empty'}"],
         f"mochi_jax.prepare: {tmp_path / 'empty'}: no videos"),
        (["-m", "mochi_jax.train", f"--config.run_dir={f / 'run'}"], f"mochi_jax.train: {f}: Not a directory"),
        (["-m", "mochi_jax.sample", f"--config.out_dir={f}"], f"mochi_jax.sample: {f}: Not a directory"),
        (["-m", "mochi_jax.evaluate", f"--config.model.dit={tmp_path / 'nodit'}"],
         f"mochi_jax.evaluate: model.dit: {tmp_path / 'nodit'} does not exist"),
        (["-m", "mochi_jax.aot", "--config.aot.target=no-such-chip"], "mochi_jax.aot: "),
        (["-m", "mochi_jax.train", "--config.no_such_field=1"], "mochi_jax.train: --config.no_such_field: the config "
                                                                 "has no field 'no_such_field'"),
        (["-m", "mochi_jax.train", "--config.steps=abc"], "mochi_jax.train: bad flags: flag --config.steps=abc: "),
        # list and tuple fields set as Python literals: the flags are taken, the missing input is named
        (["-m", "mochi_jax.train", '--config.validation.prompts=["a dog surfing", "a cat"]',
          f"--config.cache={tmp_path / 'nocache'}"], f"mochi_jax.train: {tmp_path / 'nocache' / 'manifest.json'}: "),
        (["-m", "mochi_jax.prepare", "--config.buckets=((480,848),(848,480))", f"--config.input_dir={tmp_path / 'no'}"],
         f"mochi_jax.prepare: {tmp_path / 'no'}: input_dir does not exist"),
        (["-m", "mochi_jax.sample", "--config=configs/nope.py"], "mochi_jax.sample: --config=configs/nope.py: no such"),
        (["-m", "mochi_jax.sample", f"--config.model.dit={tmp_path / 'nodit'}"],
         f"mochi_jax.sample: {tmp_path / 'nodit'}: No such checkpoint (make one with tools/convert_weights.py "),
        ([str(ROOT / "tools" / "convert_weights.py"), "dit", str(tmp_path / "nope.safetensors"), str(tmp_path / "o")],
         f"tools/convert_weights.py: {tmp_path / 'nope.safetensors'} does not exist"),
        ([str(ROOT / "tools" / "lora.py"), "info", str(f)], f"tools/lora.py: {f}: expected a .safetensors file"),
        ([str(ROOT / "tools" / "lora.py"), "info", str(tmp_path)], f"tools/lora.py: {tmp_path} is a folder; name "),
        ([str(ROOT / "tools" / "lora.py"), "merge", str(f), str(f), str(tmp_path / "o")],
         f"tools/lora.py: {f} is not a checkpoint written by tools/convert_weights.py (make one with "),
    ]
    for args, expect in cases:
        r = _run(args, tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        last, = r.stderr.strip().splitlines()  # one line: no libtpu, absl or orbax lines around it
        assert last.startswith(expect), (args, r.stderr)
        assert ".tmp" not in last
    print(json.dumps([a[:2] for a, _ in cases]))
