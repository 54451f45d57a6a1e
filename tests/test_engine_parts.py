"""The engine's parts: δ-only ascent steps in the iteration, backward schedules as objects, the no_sync owner,
and the finiteness checks (one host read per step, counted)."""

from __future__ import annotations

import collections
import inspect
import pathlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import advlab
from advlab.distributed import GradSync, is_ddp
from advlab.finite import FiniteChecks, GradSnapshot
from advlab.schedules import SCHEDULES, DeferredSchedule, LeanSchedule, RetainSchedule, make_schedule
from tests.tiny_models import TinyVL, grads, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def count_host_reads(monkeypatch):
    """Counts every Tensor -> Python read (the device-to-host syncs on an accelerator) while active."""
    counts: collections.Counter = collections.Counter()
    state = {"on": False}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            if state["on"]:
                caller = inspect.stack(0)[1]
                counts[(_name, pathlib.Path(caller.filename).name, caller.function)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counts, state


@pytest.mark.parametrize(("make", "scaler"), [
    (lambda m: advlab.VILLA(m, SITES, steps=3), False),
    (lambda m: advlab.VILLA(m, SITES, steps=3, mode="alter", schedule="lean"), False),
    (lambda m: advlab.FreeLB(m, SITES, steps=3, init_magnitude=0.1), False),
    (lambda m: advlab.SMART(m, SITES, steps=3), False),
    (lambda m: advlab.TRADES(m, SITES, steps=3), False),
    (lambda m: advlab.FastAT(m, SITES, eps=0.1), False),
    (lambda m: advlab.R3F(m, SITES), False),
    (lambda m: advlab.VILLA(m, SITES, steps=3), True),
    (lambda m: advlab.SMART(m, SITES, steps=3), True),
], ids=["villa", "villa-alter-lean", "freelb", "smart", "trades", "fast_at", "r3f", "villa-scaler", "smart-scaler"])
def test_one_host_read_per_step_in_the_engine(make, scaler, count_host_reads):
    """Finiteness stays on the device and is read once per step (plus one read of the GradScaler's scale when
    δ moves under a scaler); `collect_stats` reads the reported numbers once. Bool masks cost no read."""
    counts, state = count_host_reads
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    recipe = make(model)
    kw = {"scaler": torch.amp.GradScaler("cpu", init_scale=4.0)} if scaler else {}
    step = lambda: recipe.step(lambda: model(ids, img, tm, im), lambda o: F.cross_entropy(o, y),
                               masks={"txt": tm, "img": im}, **kw)
    step()  # first call: lazy initialisation (the scaler's scale tensor) is not the steady state
    state["on"] = True
    step()
    state["on"] = False
    engine = {k: v for k, v in counts.items() if k[1] != "stats.py"}
    assert counts[("tolist", "stats.py", "collect_stats")] == 1
    expected = {("tolist", "finite.py", "read"): 1}
    if scaler:
        expected[("item", "grad_scaler.py", "get_scale")] = 1
    assert engine == expected


def test_one_host_read_however_many_ascent_steps(count_host_reads):
    counts, state = count_host_reads
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    for steps in (1, 6):
        counts.clear()
        state["on"] = True
        advlab.VILLA(model, SITES, steps=steps).step(lambda: model(ids, img, tm, im), lambda o: F.cross_entropy(o, y))
        state["on"] = False
        assert sum(v for k, v in counts.items() if k[1] == "finite.py") == 1


# ---------------------------------------------------------------------------------------- δ-only steps
def _manual_and_iterated(k, schedule="deferred"):
    """The same δ-only ascent written with `ft.ascend` before the iteration and with `delta_steps=k`."""
    batch = tiny_batch()
    ids, img, tm, im, y = batch
    fwd = lambda m: (lambda: m(ids, img, tm, im))
    perts = {"txt": advlab.Perturbation(0.05, radius=0.2, init=advlab.NormalSampler(0.01)),
             "img": advlab.Perturbation(0.02, norm="linf", direction="sign")}
    out = []
    for iterated in (False, True):
        model = TinyVL().double()
        g = torch.Generator().manual_seed(4)
        extra = {"delta_steps": k} if iterated else {}
        with advlab.free_training(model, SITES, perts, masks={"txt": tm, "img": im}, schedule=schedule, generator=g,
                                  **extra) as ft:
            clean = ft.clean(fwd(model))
            ft.clean_loss(lambda o: F.cross_entropy(o, y))
            target = ft.clean_logits.detach()
            if not iterated:
                for _ in range(k):
                    ft.ascend(advlab.kl_divergence(target, ft.forward(fwd(model))))
            kinds = []
            for step in ft:
                kinds.append(step.delta_only)
                adv = ft.forward(fwd(model))
                if step.delta_only:
                    assert all(p.grad is None for p in model.parameters())  # δ-only: no parameter gradient
                    ft.backward(advlab.kl_divergence(target, adv))
                else:
                    ft.backward(advlab.symmetric_kl(adv, ft.clean_logits))
            deltas = [d.detach().clone() for m in ("txt", "img") for d in ft.deltas(m)]
        out.append((grads(model), deltas, kinds))
    del clean
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("k", [1, 3])
def test_delta_only_steps_equal_manual_ascend_calls_bit_for_bit(k, schedule):
    (g1, d1, kinds1), (g2, d2, kinds2) = _manual_and_iterated(k, schedule)
    assert kinds1 == [False] and kinds2 == [True] * k + [False]
    assert all(torch.equal(g1[n], g2[n]) for n in g1) and g1.keys() == g2.keys()
    assert all(torch.equal(a, b) for a, b in zip(d1, d2))


def test_delta_only_steps_against_a_hand_written_loop():
    """f(x) = W (x + δ) with a linear ascent: δ_{j+1} = δ_j + η ∇δ ½‖W(x + δ_j) - t‖², then the training loss
    ½‖W(x + δ_K) - t‖² back-propagated once (float64, 1e-10)."""
    torch.manual_seed(0)
    emb, lin = nn.Embedding(5, 3).double(), nn.Linear(3, 2, bias=False).double()
    model = nn.Sequential(emb, lin)
    ids, t = torch.tensor([[1, 2], [3, 4]]), torch.randn(2, 2, 2, dtype=torch.float64)
    eta, k = 0.3, 3

    def ascender(delta, grad, *, mask=None, generator=None):
        return delta + eta * grad

    loss = lambda out: 0.5 * ((out - t) ** 2).sum()
    with advlab.free_training(model, {"x": "0"}, {"x": advlab.Perturbation(eta)}, ascender=ascender,
                              delta_steps=k) as ft:
        for step in ft:
            out = ft.forward(lambda: model(ids))
            ft.backward(loss(out))
    x = emb(ids).detach()
    w = lin.weight.detach()
    delta = torch.zeros_like(x)
    for _ in range(k):
        delta = delta + eta * ((x + delta) @ w.T - t) @ w  # ∇δ ½‖W(x + δ) - t‖²
    residual = (x + delta) @ w.T - t
    want_w = torch.einsum("bni,bnj->ij", residual, x + delta)
    want_emb = torch.zeros_like(emb.weight)
    want_emb.index_add_(0, ids.flatten(), (residual @ w).reshape(-1, 3))
    torch.testing.assert_close(lin.weight.grad, want_w, rtol=0, atol=1e-10)
    torch.testing.assert_close(emb.weight.grad, want_emb, rtol=0, atol=1e-10)
    torch.testing.assert_close(ft.deltas("x")[0], delta, rtol=0, atol=1e-10)


def test_delta_only_step_misuse_gets_clear_errors():
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    fwd = lambda: model(ids, img, tm, im)
    perts = {"txt": advlab.Perturbation()}
    with (pytest.raises(advlab.AdvlabValueError, match="δ-only step 0 to end with `ft.backward"),
          advlab.free_training(model, SITES, perts, delta_steps=2) as ft):
        for _ in ft:
            ft.forward(fwd)
    with (pytest.raises(advlab.AdvlabValueError, match="got `accumulate`"),
          advlab.free_training(model, SITES, perts, delta_steps=1) as ft):
        for _ in ft:
            ft.accumulate(F.cross_entropy(ft.forward(fwd), y))
    for bad in (-1, 1.5, True):
        with pytest.raises(advlab.AdvlabValueError, match="`delta_steps`"):
            advlab.free_training(model, SITES, {"txt": advlab.Perturbation()}, delta_steps=bad)
    assert all(p.grad is None for p in model.parameters())


@given(k=st.integers(0, 4), steps=st.integers(1, 3))
def test_iteration_yields_delta_only_steps_then_training_steps(k, steps):
    model = TinyVL()
    ids, img, tm, im, y = tiny_batch(dtype=torch.float32)
    seen = []
    with advlab.free_training(model, SITES, {"txt": advlab.Perturbation()}, steps=steps, delta_steps=k) as ft:
        for step in ft:
            seen.append((step.delta_only, step.index, step.last))
            ft.backward(F.cross_entropy(ft.forward(lambda: model(ids, img, tm, im)), y))
    assert seen == [(True, j, False) for j in range(k)] + [(False, j, j == steps - 1) for j in range(steps)]


# ---------------------------------------------------------------------------------------- schedules
def test_schedules_are_objects_chosen_by_name():
    assert [type(make_schedule(n)) for n in SCHEDULES] == [DeferredSchedule, RetainSchedule, LeanSchedule]
    assert make_schedule("deferred") is not make_schedule("deferred")  # one per context (lean keeps state)
    with pytest.raises(advlab.AdvlabValueError, match=r"`schedule` to be one of \['deferred', 'retain', 'lean'\]"):
        make_schedule("eager")
    flags = {n: (s.retain_graph, s.guards_clean_graph, s.recomputes_clean)
             for n in SCHEDULES for s in [make_schedule(n)]}
    assert flags == {"deferred": (False, True, False), "retain": (True, False, False), "lean": (False, False, True)}


def test_lean_schedule_replays_the_rng_and_leaves_it_as_it_was():
    lean = LeanSchedule()
    torch.manual_seed(7)
    first = lean.run_clean(lambda: F.dropout(torch.ones(64), 0.5))
    after = torch.get_rng_state()
    assert not first.requires_grad
    again = lean.recompute()
    assert torch.equal(again, first) and torch.equal(torch.get_rng_state(), after)


def test_no_engine_error_is_recognised_by_its_message():
    """Errors are told apart by type or by a hook, never by matching their text (e.g. torch's 'second time')."""
    root = pathlib.Path(advlab.__file__).parent
    for name in ("free.py", "schedules.py", "distributed.py", "finite.py", "recipe.py"):
        text = (root / name).read_text()
        assert "second time" not in text and "in str(e" not in text and "args[0]" not in text, name


# ---------------------------------------------------------------------------------------- sync and checks
def test_grad_sync_is_inert_outside_ddp():
    model = nn.Linear(2, 2)
    sync = GradSync(model)
    assert not is_ddp(model) and not sync.distributed
    sync.hold()
    assert not sync.held
    flags = torch.tensor([True, False])
    assert sync.agree(flags) is flags
    sync.release()


def test_grad_sync_enters_no_sync_once_and_leaves_it():
    entered = []

    class FakeDDP(nn.Linear):
        def no_sync(self):
            import contextlib

            @contextlib.contextmanager
            def ctx():
                entered.append("in")
                yield
                entered.append("out")

            return ctx()

    sync = GradSync(FakeDDP(2, 2))
    sync.distributed = True  # as for a DDP wrapper
    sync.hold()
    sync.hold()
    assert entered == ["in"] and sync.held
    sync.release()
    assert entered == ["in", "out"] and not sync.held
    with sync:
        sync.hold()
    assert entered == ["in", "out", "in", "out"]


def test_finite_checks_read_once_in_order():
    checks = FiniteChecks()
    assert checks.read() == []
    checks.note(0, "loss", torch.tensor([1.0, float("inf")]))
    checks.note(None, "clean loss", torch.tensor(2.0))
    checks.note_flag(1, "δ gradient", torch.tensor(False))
    assert len(checks) == 3
    assert checks.read() == [(0, "loss"), (1, "δ gradient")]
    assert checks.read(lambda flags: torch.ones_like(flags)) == []  # what the ranks agreed on decides


def test_grad_snapshot_restores_the_same_tensors_and_bits():
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    weight_grad, before = model.weight.grad, model.weight.grad.clone()
    snap = GradSnapshot(model)
    model(torch.full((1, 3), float("nan"))).sum().backward()
    model.bias.grad = None
    snap.restore()
    assert model.weight.grad is weight_grad and torch.equal(model.weight.grad, before)
    assert model.bias.grad is not None and torch.equal(model.bias.grad, torch.ones(2))
