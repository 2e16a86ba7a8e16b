"""remat='auto': the least recomputation whose compiled memory fits a budget (mochi_jax/models/remat.py),
picked by the trainer on the devices at hand and recorded in the run directory."""

import json

import pytest
from ml_collections import ConfigDict

from compiles import compiled_functions
from mochi_jax.configs import lora as lora_config
from mochi_jax.demo import write_demo_models
from mochi_jax.lib import trainer
from mochi_jax.models import remat

pytestmark = pytest.mark.usefixtures("shared_compilations")  # the second test's search reuses the first's compiles


def test_ladder_runs_from_least_to_most_recomputation():
    ladder = remat.ladder(3)
    assert ladder[0] == ("none", "") and ladder[-1] == ("offload:residual_bf16", "")
    assert ladder[1:4] == [("full", "none:2,dots:1"), ("full", "none:1,dots:2"), ("dots", "")]
    assert ladder[9] == ("full", "")  # the last setting that keeps everything on the device
    # past 'full', the block inputs go to pinned host memory: in float32, then rounded to bfloat16
    assert ladder[10:] == [("full", "full:2,offload:residual:1"), ("full", "full:1,offload:residual:2"),
                           ("offload:residual", ""), ("full", "offload:residual:2,offload:residual_bf16:1"),
                           ("full", "offload:residual:1,offload:residual_bf16:2"), ("offload:residual_bf16", "")]
    assert len(ladder) == 1 + 5 * 3  # 3 steps between each neighbouring pair of the 6 policies
    # with a fused attention kernel 'dots' keeps the kernel's residuals too, and 'save:attn' (matmuls
    # recomputed, attention kept) comes between it and 'full'
    for attention in ("cudnn", "splash"):
        fused = remat.ladder(2, attention)
        assert fused == [("none", ""), ("full", "none:1,dots:1"), ("dots", ""), ("full", "dots:1,save:attn:1"),
                         ("save:attn", ""), ("full", "save:attn:1,full:1"), ("full", ""),
                         ("full", "full:1,offload:residual:1"), ("offload:residual", ""),
                         ("full", "offload:residual:1,offload:residual_bf16:1"), ("offload:residual_bf16", "")], fused


def test_bisection_fits_and_a_larger_budget_never_recomputes_more():
    mem = {s: 100 - 7 * i + (5 if i % 4 == 1 else 0) for i, s in enumerate(remat.ladder(4))}  # not monotone
    index = {s: i for i, s in enumerate(remat.ladder(4))}
    last = None
    for budget in range(int(min(mem.values())), 120):
        choice = remat.choose(4, lambda r, g: mem[(r, g)], budget)
        assert choice.bytes <= budget and mem[(choice.remat, choice.groups)] == choice.bytes
        i = index[(choice.remat, choice.groups)]
        assert last is None or i <= last, (budget, i, last)
        last = i
        assert len(choice.tried) <= 6  # bisection over 13 settings
    with pytest.raises(ValueError, match="even remat 'full' needs"):
        remat.choose(4, lambda r, g: mem[(r, g)], min(mem.values()) - 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_demo_models(tmp_path_factory.mktemp("models"))


def _config(models, run_dir, budget_gb):
    cfg = lora_config.get_config()
    cfg.model.update(dict(dit=str(models["dit"]), param_dtype="float32", compute_dtype="float32", remat="auto",
                          memory_budget_gb=budget_gb))
    cfg.mesh = ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=1))
    cfg.run_dir = str(run_dir)
    return cfg


SHAPE, TOKENS = (12, 2, 4, 6), 8


@pytest.mark.slow
def test_auto_on_the_devices_at_hand_uses_compiled_memory(models, tmp_path, monkeypatch):
    """The tiny DiT's train step compiled for this CPU: with room for everything nothing is
    recomputed; 'full' keeps less than 'none'; over the real compiled memories every choice fits
    its budget and a larger budget never picks more recomputation."""
    ladder, captured = remat.ladder(2), {}
    real_choose = remat.choose

    def capture(n, memory_of, budget, attention):
        captured["memory_of"] = memory_of
        return real_choose(n, memory_of, budget, attention)

    monkeypatch.setattr(remat, "choose", capture)
    roomy = trainer.resolve_auto_remat(_config(models, tmp_path, 1.0), SHAPE, TOKENS)
    assert (roomy.remat, roomy.groups) == ladder[0], roomy
    # every setting's compiled bytes up to 'full': past it the block inputs go to host memory, which on
    # a CPU is the device's own (tests/test_remat_offload.py checks those), and choose never compiles
    # them while 'full' fits, as at every budget below
    full = ladder.index(("full", ""))
    mem = {s: captured["memory_of"](*s) for s in ladder[:full + 1]}
    assert mem[ladder[full]] < mem[ladder[0]], mem
    last = None
    for budget in sorted(v for v in set(mem.values()) if v >= mem[ladder[full]]):
        choice = real_choose(2, lambda r, g: mem[(r, g)], budget)
        i = ladder.index((choice.remat, choice.groups))
        assert choice.bytes <= budget and (last is None or i <= last), (budget, i, last)
        last = i
    assert last == 0


@pytest.mark.slow
def test_a_resumed_run_takes_the_recorded_pick_without_compiling(models, tmp_path):
    """The pick is written to the run directory with what it was picked for; the same settings
    again (a resume) compile nothing; another budget searches again."""
    cfg = _config(models, tmp_path, 1.0)
    choice = trainer.resolve_auto_remat(cfg, SHAPE, TOKENS)
    assert len(choice.tried) >= 2, choice  # the search compiled the ladder's ends at least
    record = json.loads((tmp_path / trainer.REMAT_RECORD).read_text())
    assert (record["remat"], record["groups"]) == (choice.remat, choice.groups)
    assert record["for"]["latent"] == list(SHAPE) and record["for"]["budget_bytes"] == 1 << 30
    with compiled_functions() as again:
        resumed = trainer.resolve_auto_remat(_config(models, tmp_path, 1.0), SHAPE, TOKENS)
    assert again == [] and resumed.tried == []  # nothing lowered, nothing compiled, no setting measured
    assert (resumed.remat, resumed.groups, resumed.bytes) == (choice.remat, choice.groups, choice.bytes)
    other = trainer.resolve_auto_remat(_config(models, tmp_path, 0.5), SHAPE, TOKENS)
    assert other.tried, "another budget must search again"
