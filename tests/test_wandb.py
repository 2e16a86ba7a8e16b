"""Weights & Biases logging (configs/lora.py `wandb`): the trainer's records go to a wandb run as well,
read back here from wandb's own offline file (WANDB_MODE=offline, nothing leaves the machine): the
scalars at their steps, the validation videos, the config; the run's wandb id is kept in the run
directory, so a resumed run continues the same wandb run; wandb enabled but not installed is refused
in one line, exit status 2, before anything is written."""

import json
import sys

import numpy as np
import pytest

from mochi_jax import cli, train
from mochi_jax.configs import lora as lora_config
from mochi_jax.lib import trainer
from mochi_jax.lib.video import write_mp4
from wandb_records import all_of, history, offline_runs

pytestmark = pytest.mark.usefixtures("shared_compilations")


def test_run_log_rows_and_videos_go_to_the_wandb_run_and_a_second_launch_continues_it(tmp_path, offline):
    """RunLog with a WandbMirror: every row's scalars at its step (training and validation rows of one
    step in one history row), the validation video as a wandb video under its tensorboard tag, the
    config; the wandb id in the run directory, reused by the next launch."""
    cfg = lora_config.get_config()
    cfg.wandb.enabled, cfg.wandb.tags = True, ["unit"]
    run_dir = tmp_path / "myrun"
    run_dir.mkdir()
    mirror = trainer.WandbMirror.start(trainer.wandb_module(cfg), cfg, run_dir)
    run_id = (run_dir / trainer.WANDB_ID).read_text().strip()
    log = trainer.RunLog(run_dir, prompts=["a red ball"], wandb=mirror).open(0)
    video = write_mp4(run_dir / "samples" / "step000002_prompt0_seed12345.mp4",
                      np.zeros((7, 48, 80, 3), np.uint8) + np.arange(7, dtype=np.uint8)[:, None, None, None] * 30)
    log.write(1, {"loss": 1.5, "grad_norm": 0.25, "lr": 1e-4})
    log.write(2, {"loss": 1.25, "grad_norm": 0.5, "lr": 2e-4, "variant/r4/loss": 1.0})
    log.videos(2, [str(video)])
    log.write(2, {"val_loss": 0.75, "val_loss/sigma_0.1": 0.5})
    log.close()
    mirror.finish(0)

    folder, = offline_runs(offline)
    assert folder.name.endswith(f"-{run_id}")
    run, = all_of(folder, "run")
    assert run.run_id == run_id and run.project == "mochi_jax" and run.display_name == "myrun"
    assert list(run.tags) == ["unit"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["steps"] == 2000 and config["wandb"]["enabled"] is True and config["lora"]["qkv"]["rank"] == 16
    rows = history(folder)
    assert [r["_step"] for r in rows] == [1, 2]
    assert {k: rows[0][k] for k in ("loss", "grad_norm", "lr")} == {"loss": 1.5, "grad_norm": 0.25, "lr": 1e-4}
    assert rows[1]["loss"] == 1.25 and rows[1]["variant/r4/loss"] == 1.0 and rows[1]["val_loss"] == 0.75
    assert rows[1]["val_loss/sigma_0.1"] == 0.5
    tag = "val_video/0_a_red_ball"
    assert rows[1][f"{tag}/_type"] == "video-file" and rows[1][f"{tag}/caption"] == "a red ball"
    assert (folder / "files" / rows[1][f"{tag}/path"]).stat().st_size == video.stat().st_size
    assert [e.exit_code for e in all_of(folder, "exit")] == [0]

    # the next launch of the run: the same wandb run id; a stop marks it preempted, exit code 75
    mirror = trainer.WandbMirror.start(trainer.wandb_module(cfg), cfg, run_dir)
    assert (run_dir / trainer.WANDB_ID).read_text().strip() == run_id
    log = trainer.RunLog(run_dir, prompts=["a red ball"], wandb=mirror).open(2)
    log.write(3, {"loss": 1.0})
    log.close()
    mirror.finish(trainer.Stopped.exit_status, stopped=True)
    first, second = offline_runs(offline)
    assert first == folder and second.name.endswith(f"-{run_id}")
    assert all_of(second, "run")[0].run_id == run_id
    assert [(r["_step"], r["loss"]) for r in history(second)] == [(3, 1.0)]
    assert len(all_of(second, "preempting")) == 1 and [e.exit_code for e in all_of(second, "exit")] == [75]


def test_enabled_without_wandb_installed_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as when it is not installed
    cfg = lora_config.get_config()
    cfg.run_dir = str(tmp_path / "run")
    cfg.wandb.enabled = True
    with pytest.raises(ValueError) as e:
        train.train(cfg)
    assert cli.fail("mochi_jax.train", e.value) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mochi_jax.train: wandb.enabled is set but wandb cannot be "
                                                   "imported"), err
    assert "pip install -e '.[wandb]'" in err and "--config.wandb.enabled=False" in err
    assert not (tmp_path / "run").exists()  # nothing written
    cfg.wandb.enabled = False  # off: wandb is never imported
    assert trainer.wandb_module(cfg) is None


def test_an_unknown_wandb_mode_is_refused_at_once(tmp_path):
    cfg = lora_config.get_config()
    cfg.run_dir = str(tmp_path / "run")
    cfg.wandb.enabled, cfg.wandb.mode = True, "ofline"
    with pytest.raises(ValueError, match=r"^wandb.mode = 'ofline': choose online, offline, disabled or ''"):
        train.train(cfg)
    assert not (tmp_path / "run").exists()
