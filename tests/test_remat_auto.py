"""remat='auto': the least recomputation whose compiled memory fits a budget (mochi_jax/fit.py)."""

import pytest
from ml_collections import ConfigDict

from mochi_jax import fit
from mochi_jax.configs import lora as lora_config
from mochi_jax.demo import write_demo_models


def test_ladder_runs_from_least_to_most_recomputation():
    ladder = fit.remat_ladder(3)
    assert ladder[0] == ("none", "") and ladder[-1] == ("full", "")
    assert ladder[1:4] == [("full", "none:2,dots:1"), ("full", "none:1,dots:2"), ("dots", "")]
    assert len(ladder) == 1 + 3 * 3  # 3 steps between each neighbouring pair of the 4 policies
    # with a fused attention kernel 'dots' keeps the kernel's residuals too, and 'save:attn' (matmuls
    # recomputed, attention kept) comes between it and 'full'
    for attention in ("cudnn", "splash"):
        fused = fit.remat_ladder(2, attention)
        assert fused == [("none", ""), ("full", "none:1,dots:1"), ("dots", ""), ("full", "dots:1,save:attn:1"),
                         ("save:attn", ""), ("full", "save:attn:1,full:1"), ("full", "")], fused


def test_bisection_fits_and_a_larger_budget_never_recomputes_more():
    mem = {s: 100 - 7 * i + (5 if i % 4 == 1 else 0) for i, s in enumerate(fit.remat_ladder(4))}  # not monotone
    index = {s: i for i, s in enumerate(fit.remat_ladder(4))}
    last = None
    for budget in range(int(min(mem.values())), 120):
        choice = fit.choose_remat(4, lambda r, g: mem[(r, g)], budget)
        assert choice.bytes <= budget and mem[(choice.remat, choice.groups)] == choice.bytes
        i = index[(choice.remat, choice.groups)]
        assert last is None or i <= last, (budget, i, last)
        last = i
        assert len(choice.tried) <= 6  # bisection over 13 settings
    with pytest.raises(fit.BadInput, match="even remat 'full' needs"):
        fit.choose_remat(4, lambda r, g: mem[(r, g)], min(mem.values()) - 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_demo_models(tmp_path_factory.mktemp("models"))


def test_auto_on_the_devices_at_hand_uses_compiled_memory(models, monkeypatch):
    """The tiny DiT's train step compiled for this CPU: with room for everything nothing is
    recomputed; 'full' keeps less than 'none'; over the real compiled memories every choice fits
    its budget and a larger budget never picks more recomputation."""
    cfg = lora_config.get_config()
    cfg.model.update(dict(dit=str(models["dit"]), param_dtype="float32", compute_dtype="float32", remat="auto"))
    cfg.mesh = ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=1))
    shape, ladder, captured = (12, 2, 4, 6), fit.remat_ladder(2), {}
    real_choose = fit.choose_remat

    def capture(n, memory_of, budget, attention):
        captured["memory_of"] = memory_of
        return real_choose(n, memory_of, budget, attention)

    monkeypatch.setattr(fit, "choose_remat", capture)
    cfg.model.memory_budget_gb = 1.0
    roomy = fit.choose_remat_here(cfg, shape, 8)
    assert (roomy.remat, roomy.groups) == ladder[0], roomy
    mem = {s: captured["memory_of"](*s) for s in ladder}  # every setting's compiled bytes
    assert mem[ladder[-1]] < mem[ladder[0]], mem
    last = None
    for budget in sorted(set(mem.values())):
        choice = real_choose(2, lambda r, g: mem[(r, g)], budget)
        i = ladder.index((choice.remat, choice.groups))
        assert choice.bytes <= budget and (last is None or i <= last), (budget, i, last)
        last = i
    assert last == 0
