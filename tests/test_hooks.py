"""Hook lifetime: hooks exist only inside `free_training` / `perturb_sites`, are removed on every exit,
leave the model bit-identical, run exactly as often as expected, and check what they see."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import advlab
from tests.strategies import generator, seeds
from tests.tiny_models import TinyVL, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# bookkeeping dicts keyed by the same handle ids (a with_kwargs hook is in both)
SIDE_DICTS = ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def hook_counts(model: nn.Module) -> dict[str, int]:
    """Number of hooks per module, for the modules that have any."""
    out = {}
    for name, m in model.named_modules():
        n = sum(len(getattr(m, attr, {})) for attr in HOOK_DICTS)
        if n:
            out[name or "<root>"] = n
    return out


def assert_no_hooks(model: nn.Module) -> None:
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        for attr in SIDE_DICTS:
            assert not getattr(m, attr, {}), attr
    assert hook_counts(model) == {}


def setup(dtype=torch.float64, seed=1):
    model = TinyVL().to(dtype)
    ids, img, txt_mask, img_mask, y = tiny_batch(dtype=dtype, seed=seed)

    def forward():
        return model(ids, img, txt_mask, img_mask)

    with torch.no_grad():
        before = forward()
    return model, forward, {"txt": txt_mask, "img": img_mask}, y, before


def unhooked_output(forward):
    with torch.no_grad():
        return forward()


def perts(step_size=0.1, **kwargs):
    return {"txt": advlab.Perturbation(step_size, **kwargs), "img": advlab.Perturbation(step_size, **kwargs)}


# ---------------------------------------------------------------------------------------------- exits


class Boom(Exception):
    pass


EXITS = ["normal", "exception", "keyboard", "exception_in_forward", "advlab_mask", "advlab_no_backward"]


def run_and_exit(exit_kind: str, *, steps: int, mode: str, at: int, gen: torch.Generator | None = None):
    """Run a free-training loop that leaves by `exit_kind` at step `at`; return what the test needs."""
    model, forward, masks, y, before = setup()
    if exit_kind == "advlab_mask":
        wrong = "img" if mode == "img" else "txt"  # a perturbed modality's mask (others are never looked at)
        masks = {**masks, wrong: masks[wrong][:, :-1]}  # wrong shape: found by the hook, mid-forward
    seen_hooks = {}
    expected = {
        "normal": None,
        "exception": Boom,
        "keyboard": KeyboardInterrupt,
        "exception_in_forward": Boom,
        "advlab_mask": advlab.AdvlabValueError,
        "advlab_no_backward": advlab.AdvlabValueError,
    }[exit_kind]

    def body():
        with advlab.free_training(model, SITES, perts(), steps=steps, mode=mode, masks=masks, generator=gen) as ft:
            seen_hooks.update(hook_counts(model))
            ft.clean(forward)
            for step in ft:
                if step.index == at and exit_kind == "exception":
                    raise Boom("user code failed")
                if step.index == at and exit_kind == "keyboard":
                    raise KeyboardInterrupt
                loss = 0.0
                for group in step.groups:
                    if step.index == at and exit_kind == "exception_in_forward":

                        def broken():
                            forward()
                            raise Boom("after the model ran, hooks active")

                        ft.forward(broken, group)
                    out = ft.forward(forward, group)
                    loss = loss + F.cross_entropy(out, y) + advlab.symmetric_kl(out, step.clean_logits)
                if step.index == at and exit_kind == "advlab_no_backward":
                    continue  # the iterator raises: every step must end with ft.backward
                ft.backward(loss / steps)
        return ft

    if expected is None:
        ft = body()
    else:
        with pytest.raises(expected):
            body()
        ft = None
    return model, forward, before, seen_hooks, ft


@pytest.mark.parametrize("exit_kind", EXITS)
def test_no_hook_remains_and_outputs_are_bit_identical_after_any_exit(exit_kind):
    model, forward, before, seen_hooks, ft = run_and_exit(exit_kind, steps=2, mode="joint", at=1)
    assert seen_hooks == {"word": 1, "img_proj": 1}  # the hooks did exist inside
    assert_no_hooks(model)
    assert torch.equal(unhooked_output(forward), before)
    if ft is not None:
        with pytest.raises(advlab.ContextExitedError):
            ft.forward(forward)


@given(
    exit_kind=st.sampled_from(EXITS),
    steps=st.integers(1, 3),
    mode=st.sampled_from(["joint", "alter", "txt", "img"]),
    at=st.integers(0, 2),
    seed=seeds,
)
def test_any_exit_at_any_step_leaves_no_hook(exit_kind, steps, mode, at, seed):
    at = min(at, steps - 1)
    if exit_kind == "advlab_no_backward" and at == steps - 1:
        exit_kind = "exception"  # no step follows the last one to notice the missing backward
    model, forward, before, seen_hooks, _ = run_and_exit(exit_kind, steps=steps, mode=mode, at=at, gen=generator(seed))
    assert sum(seen_hooks.values()) == (2 if mode in ("joint", "alter") else 1)
    assert_no_hooks(model)
    assert torch.equal(unhooked_output(forward), before)


def test_hooks_are_installed_on_entry_not_construction():
    model, _, masks = setup()[:3]
    ft = advlab.free_training(model, SITES, perts(), masks=masks)
    assert_no_hooks(model)  # construction changes nothing
    with ft:
        assert hook_counts(model) == {"word": 1, "img_proj": 1}
    assert_no_hooks(model)
    with pytest.raises(advlab.ContextExitedError), ft:  # a context is used once
        pass
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------- δ = 0, δ ≠ 0, call counts


@pytest.mark.parametrize("mode", ["joint", "alter", "txt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_delta_is_bit_identical_nonzero_changes_and_hooks_run_as_expected(mode, dtype):
    model, forward, masks, y, before = setup(dtype)
    steps = 3
    outs = []
    with advlab.free_training(model, SITES, perts(0.5), steps=steps, mode=mode, masks=masks) as ft:
        clean = ft.clean(forward)
        assert torch.equal(clean.detach(), before)
        for step in ft:
            loss = 0.0
            for group in step.groups:
                out = ft.forward(forward, group)
                outs.append((step.index, group, out.detach()))
                loss = loss + F.cross_entropy(out, y)
            ft.backward(loss / steps)
        calls = ft.hook_calls
    groups = advlab.free.forward_groups(mode, ["txt", "img"])
    perturbed = [m for g in groups for m in g]
    # every forward (the clean one and each group's) runs each hooked site once
    assert calls == {m: 1 + steps * len(groups) for m in perturbed}
    for index, group, out in outs:
        if index == 0:
            assert torch.equal(out, before), (index, group)  # ZeroSampler: δ = 0 adds exactly nothing
        else:
            assert not torch.equal(out, before), (index, group)  # δ moved by 0.5 per step: visible
    assert_no_hooks(model)
    assert torch.equal(unhooked_output(forward), before)


def test_nonzero_delta_enters_the_output_as_the_hand_written_sum():
    """The hooked output equals the model run with the held δs passed by hand (TinyVL's own plumbing)."""
    model, forward, masks, y, before = setup()
    ids, img, txt_mask, img_mask, _ = tiny_batch()
    pert = {
        "txt": advlab.Perturbation(0.1, init=advlab.NormalSampler(0.3)),
        "img": advlab.Perturbation(0.1, init=advlab.NormalSampler(0.3)),
    }
    with advlab.free_training(model, SITES, pert, masks=masks, generator=generator(3)) as ft:
        ft.clean(forward)
        for step in ft:
            out = ft.forward(forward)
            d_txt, d_img = ft.deltas("txt")[0].detach(), ft.deltas("img")[0].detach()
            assert (d_txt[~txt_mask] == 0).all() and (d_img[~img_mask] == 0).all()
            assert d_txt.abs().sum() > 0 and d_img.abs().sum() > 0
            with torch.no_grad():
                by_hand = model(ids, img, txt_mask, img_mask, delta_txt=d_txt, delta_img=d_img)
            assert torch.equal(out.detach(), by_hand)
            assert not torch.equal(out.detach(), before)
            ft.backward(F.cross_entropy(out, y))


# ---------------------------------------------------------------------------------------------- calls=2


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, a, b):
        return self.head(torch.cat([torch.tanh(self.embed(a)), torch.tanh(self.embed(b))], -1).mean(1))


def siamese_batch(dtype=torch.float64):
    g = generator(5)
    return torch.randn(2, 3, 3, generator=g, dtype=dtype), torch.randn(2, 3, 3, generator=g, dtype=dtype)


def test_site_called_twice_gets_two_independent_deltas():
    model = Siamese().double()
    a, b = siamese_batch()
    y = torch.tensor([0, 1])
    site = {"x": advlab.Site("embed", calls=2)}
    with advlab.free_training(model, site, {"x": advlab.Perturbation(0.2)}, steps=3) as ft:
        ft.clean(lambda: model(a, b))
        for step in ft:
            out = ft.forward(lambda: model(a, b))
            d0, d1 = (d.detach() for d in ft.deltas("x"))
            with torch.no_grad():
                by_hand = model.head(
                    torch.cat([torch.tanh(model.embed(a) + d0), torch.tanh(model.embed(b) + d1)], -1).mean(1)
                )
            assert torch.equal(out.detach(), by_hand)
            if step.index > 0:
                assert not torch.equal(d0, d1)  # each call ascended its own gradient
                assert d0.abs().sum() > 0 and d1.abs().sum() > 0
            ft.backward(F.cross_entropy(out, y))
        assert ft.hook_calls == {"x": 2 * (1 + 3)}
    assert_no_hooks(model)


def test_second_call_without_calls_2_raises():
    model = Siamese().double()
    a, b = siamese_batch()
    with (
        pytest.raises(advlab.AdvlabValueError, match=r"'embed'.*calls=2"),
        advlab.free_training(model, {"x": "embed"}, {"x": advlab.Perturbation(0.2)}) as ft,
    ):
        ft.clean(lambda: model(a, b))
    assert_no_hooks(model)


def test_site_not_called_raises_naming_it():
    model, forward, masks, _, before = setup()
    model.unused = nn.Linear(8, 8)
    with (
        pytest.raises(advlab.AdvlabValueError, match=r"'unused'.*not called"),
        advlab.free_training(
            model, {**SITES, "extra": "unused"}, {**perts(), "extra": advlab.Perturbation()}, masks=masks
        ) as ft,
    ):
        ft.clean(forward)
    assert_no_hooks(model)
    assert torch.equal(unhooked_output(forward), before)


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.txt = nn.Linear(4, 4)
        self.img = nn.Linear(4, 4)

    def forward(self, t, i):
        return self.txt(t).mean((0, 1)) + self.img(i).mean((0, 1))


def test_mismatched_batch_dims_between_sites_raise():
    model = TwoTowers()
    t, i = torch.zeros(2, 3, 4), torch.zeros(3, 3, 4)
    pert = {"t": advlab.Perturbation(), "i": advlab.Perturbation()}
    with (
        pytest.raises(advlab.AdvlabValueError, match=r"batch.*\(2, 3, 4\).*\(3, 3, 4\)"),
        advlab.free_training(model, {"t": "txt", "i": "img"}, pert) as ft,
    ):
        ft.clean(lambda: model(t, i))
    assert_no_hooks(model)


@pytest.mark.parametrize(
    ("bad", "message"),
    [((4, 4), r"\(4, 5\).*\(4, 4\)"), ((4,), r"\(4, 5\).*\(4,\)"),
     ((5, 5), r"same batch size.*4 in masks\['img'\]; 5 in masks\['txt'\]")],  # refused before any forward
)
def test_mask_of_wrong_shape_raises_with_both_shapes(bad, message):
    model, forward, masks, _, before = setup()
    wrong = torch.ones(bad, dtype=torch.bool)
    with (
        pytest.raises(advlab.AdvlabValueError, match=message),
        advlab.free_training(model, SITES, perts(), masks={**masks, "txt": wrong}) as ft,
    ):
        ft.clean(forward)
    assert_no_hooks(model)
    assert torch.equal(unhooked_output(forward), before)


# ---------------------------------------------------------------------------------------------- perturb_sites


@given(seed=seeds)
def test_perturb_sites_adds_delta_and_removes_its_hooks(seed):
    model, forward, _, _, before = setup()
    ids, img, txt_mask, img_mask, _ = tiny_batch()
    gen = generator(seed)
    d_txt = torch.randn(4, 5, 8, generator=gen, dtype=torch.float64)
    d_img = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    with advlab.perturb_sites(model, {"txt": d_txt, "img": d_img}, sites=SITES):
        assert hook_counts(model) == {"word": 1, "img_proj": 1}
        out = unhooked_output(forward)
    with torch.no_grad():
        by_hand = model(ids, img, txt_mask, img_mask, delta_txt=d_txt, delta_img=d_img)
    assert torch.equal(out, by_hand)
    assert_no_hooks(model)
    assert torch.equal(unhooked_output(forward), before)


@pytest.mark.parametrize("where", ["body", "forward", "unknown_key"])
def test_perturb_sites_removes_its_hooks_on_error(where):
    model, forward, _, _, before = setup()
    deltas = {"txt": torch.ones(4, 5, 8, dtype=torch.float64), "img": torch.ones(7, 7, dtype=torch.float64)}
    if where == "unknown_key":
        deltas = {"txt": deltas["txt"], "nope": deltas["txt"]}  # the second registration fails
        expected = advlab.AdvlabValueError
    else:
        # the img delta cannot broadcast: refused in the forward, naming the site and both shapes
        expected = Boom if where == "body" else advlab.AdvlabValueError
    match = r"deltas\['img'\].*site 'img_proj'.*\(4, 3, 5\).*\(7, 7\)" if where == "forward" else None
    with pytest.raises(expected, match=match), advlab.perturb_sites(model, deltas, sites=SITES):
        if where == "body":
            raise Boom
        forward()
    assert_no_hooks(model)
    assert torch.equal(unhooked_output(forward), before)


# ---------------------------------------------------------------------------------------------- compile


def test_compiled_model_raises():
    model = setup()[0]
    compiled = torch.compile(model)  # constructed only: never run
    with pytest.raises(advlab.AdvlabValueError, match="compile"):
        advlab.free_training(compiled, SITES, perts())
    with (
        pytest.raises(advlab.AdvlabValueError, match="compile"),
        advlab.perturb_sites(compiled, {"txt": torch.zeros(1)}, sites=SITES),
    ):
        pass
    assert_no_hooks(model)


def test_compiled_submodule_raises_naming_it():
    model = setup()[0]
    model.mix.compile()  # in place: nn.Module.compile, constructed only
    with pytest.raises(advlab.AdvlabValueError, match=r"'mix'.*compile"):
        advlab.free_training(model, SITES, perts())
    with (
        pytest.raises(advlab.AdvlabValueError, match=r"'mix'.*compile"),
        advlab.perturb_sites(model, {"txt": torch.zeros(1)}, sites=SITES),
    ):
        pass
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------- after exit


def test_using_the_context_after_exit_raises():
    model, forward, masks, y = setup()[:4]
    with advlab.free_training(model, SITES, perts(), masks=masks) as ft:
        ft.clean(forward)
        for step in ft:
            ft.backward(F.cross_entropy(ft.forward(forward), y))
    for use in (
        lambda: ft.clean(forward),
        lambda: ft.forward(forward),
        lambda: ft.backward(torch.zeros((), requires_grad=True)),
        lambda: ft.ascend(torch.zeros((), requires_grad=True)),
        lambda: ft.clean_loss(torch.zeros(())),
        lambda: iter(ft).__next__(),
        lambda: ft.clean_logits,
    ):
        with pytest.raises(advlab.ContextExitedError):
            use()
    assert_no_hooks(model)


def test_using_the_context_before_entry_raises():
    model, forward, masks = setup()[:3]
    ft = advlab.free_training(model, SITES, perts(), masks=masks)
    with pytest.raises(advlab.ContextExitedError):
        ft.clean(forward)
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------- dtypes


class Recorder(nn.Module):
    """Embedding -> (records the dtype it receives) -> linear head."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4).to(dtype)
        self.head = nn.Linear(4, 2).to(dtype)
        self.seen: list[torch.dtype] = []

    def forward(self, ids):
        x = self.embed(ids)
        self.seen.append(x.dtype)
        return self.head(x).mean(1)


@pytest.mark.parametrize(
    ("site_dtype", "delta_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)],
)
def test_delta_dtype_and_site_dtype(site_dtype, delta_dtype):
    model = Recorder(site_dtype)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    y = torch.tensor([0, 1])
    pert = {"txt": advlab.Perturbation(0.1, init=advlab.NormalSampler(0.01))}
    with advlab.free_training(model, {"txt": "embed"}, pert, steps=2, generator=generator(0)) as ft:
        clean = ft.clean(lambda: model(ids))
        for step in ft:
            out = ft.forward(lambda: model(ids))
            (delta,) = ft.deltas("txt")
            assert delta.dtype == delta_dtype
            assert out.dtype == clean.dtype == site_dtype
            ft.backward(F.cross_entropy(out.float(), y))
        (delta,) = ft.deltas("txt")
        assert delta.dtype == delta_dtype  # also after the ascent step
    assert model.seen == [site_dtype] * 3  # the site output keeps its dtype downstream
    assert_no_hooks(model)


def test_bfloat16_site_gets_the_float32_delta_rounded_once():
    model = Recorder(torch.bfloat16)
    ids = torch.tensor([[1, 2, 3]])
    pert = {"txt": advlab.Perturbation(0.1, init=advlab.NormalSampler(0.05))}
    captured = {}
    with advlab.free_training(model, {"txt": "embed"}, pert, generator=generator(1)) as ft:
        ft.clean(lambda: model(ids))
        for step in ft:
            out = ft.forward(lambda: model(ids))
            captured["delta"] = ft.deltas("txt")[0].detach()
            ft.backward(out.float().sum())
    with torch.no_grad():
        expected = model.head(model.embed(ids) + captured["delta"].to(torch.bfloat16)).mean(1)
    assert_close(out.detach(), expected, rtol=0.0, atol=0.0)
