"""One shape for every recipe: frozen configs, presets as instances, keyword overrides checked against the
config's fields, and injected regularisers; every call form gives the same gradients bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import advlab
from advlab.fast_at import FastAT, FastATConfig
from advlab.freelb import FreeLB, FreeLBConfig
from advlab.neftune import NEFTune, NEFTuneConfig
from advlab.r3f import R3F, R3FConfig
from advlab.recipe import Recipe, build_config
from advlab.smart import SMART, SMART_CONFIGS, SMARTConfig
from advlab.trades import TRADES, TRADESConfig
from advlab.vat import VAT, VAT_CONFIGS, VATConfig
from advlab.villa import VILLA, VILLA_PRESETS, VILLAConfig
from tests.tiny_models import TinyVL, grads, tiny_batch

SITES = {"txt": "word", "img": advlab.Site("img_proj", where="input")}

# recipe, required keywords, a valid override and the config built by hand that it should equal
RECIPES = [
    (VILLA, {}, {"steps": 2, "kl_weight": 0.5}, dataclasses.replace(VILLA_PRESETS["official"], steps=2, kl_weight=0.5)),
    (FreeLB, {}, {"steps": 2, "init_magnitude": 0.1}, FreeLBConfig(steps=2, init_magnitude=0.1)),
    (SMART, {}, {"steps": 2, "weight": 2.0}, dataclasses.replace(SMART_CONFIGS["mt-dnn"], steps=2, weight=2.0)),
    (VAT, {"eps": 0.3}, {"steps": 2, "xi": 0.01}, VATConfig(eps=0.3, steps=2, xi=0.01)),
    (TRADES, {}, {"steps": 2, "radius": 0.2}, TRADESConfig(steps=2, radius=0.2)),
    (R3F, {}, {"eps": 0.05, "noise": "normal"}, R3FConfig(eps=0.05, noise="normal")),
    (NEFTune, {}, {"alpha": 3.0}, NEFTuneConfig(alpha=3.0)),
    (FastAT, {"eps": 0.1}, {"method": "n_fgsm"}, FastATConfig(eps=0.1, method="n_fgsm")),
]
IDS = [r[0].__name__ for r in RECIPES]


def _step(recipe, model, batch):
    ids, img, tm, im, y = batch
    model.zero_grad()
    stats = recipe.step(lambda: model(ids, img, tm, im), lambda out: F.cross_entropy(out, y),
                        masks={"txt": tm, "img": im})
    return grads(model), stats


@pytest.mark.parametrize(("cls", "required", "override", "expected"), RECIPES, ids=IDS)
def test_keyword_overrides_and_config_give_the_same_config_and_gradients(cls, required, override, expected):
    batch = tiny_batch()
    model = TinyVL().double()
    by_keywords = cls(model, SITES, generator=torch.Generator().manual_seed(3), **required, **override)
    by_config = cls(model, SITES, config=expected, generator=torch.Generator().manual_seed(3))
    assert isinstance(by_keywords, Recipe)
    assert by_keywords.config == expected == by_config.config
    g1, s1 = _step(by_keywords, model, batch)
    g2, s2 = _step(by_config, model, batch)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)
    assert (s1.task_loss, s1.kl, s1.delta_norm) == (s2.task_loss, s2.kl, s2.delta_norm)
    assert s1.overrides == {**required, **override}  # what was given, reported with the stats


@pytest.mark.parametrize(("cls", "required", "override", "expected"), RECIPES, ids=IDS)
def test_a_misspelt_keyword_is_refused_naming_the_known_fields(cls, required, override, expected):
    fields = [f.name for f in dataclasses.fields(type(expected))]
    with pytest.raises(advlab.AdvlabTypeError, match=rf"`{cls.__name__}`.*{fields[0]}.*\['stepz'\]"):
        cls(TinyVL(), SITES, stepz=3, **required)


@pytest.mark.parametrize(("cls", "required", "override", "expected"), RECIPES, ids=IDS)
def test_config_of_another_recipe_is_refused(cls, required, override, expected):
    other = NEFTuneConfig() if cls is not NEFTune else FreeLBConfig()
    with pytest.raises(advlab.AdvlabTypeError, match=rf"`config` to be a {type(expected).__name__}"):
        cls(TinyVL(), SITES, config=other)


@pytest.mark.parametrize("config", [FreeLBConfig(), VILLAConfig(), SMARTConfig(), VATConfig(eps=1.0), TRADESConfig(),
                                    R3FConfig(), NEFTuneConfig(), FastATConfig(eps=0.1)], ids=lambda c: type(c).__name__)
def test_configs_are_frozen(config):
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 5  # type: ignore[misc]


@pytest.mark.parametrize(("make", "pattern"), [
    (lambda: VILLAConfig(steps=0), "`steps`"),
    (lambda: VILLAConfig(kl_weight=-1.0), "`kl_weight`"),
    (lambda: VILLAConfig(kl_reduction="none"), "`kl_reduction`"),
    (lambda: VILLAConfig(flavour="offical"), "`flavour`"),
    (lambda: VILLAConfig(clean_loss=1), "`clean_loss`"),
    (lambda: FreeLBConfig(norm="l3"), "`norm`"),
    (lambda: FreeLBConfig(radius=-0.1), "`radius`"),
    (lambda: SMARTConfig(flavour="paper", eps=1e-6), "eps.*paper"),
    (lambda: SMARTConfig(radius=0.1), "radius.*mt-dnn"),
    (lambda: VATConfig(eps=-1.0), "`eps`"),
    (lambda: VATConfig(eps=1.0, divergence="js"), "`divergence`"),
    (lambda: TRADESConfig(direction="random"), "`direction`"),
    (lambda: R3FConfig(noise="laplace"), "`noise`"),
    (lambda: NEFTuneConfig(alpha=float("nan")), "`alpha`"),
    (lambda: FastATConfig(eps=0.1, method="pgd"), "`method`"),
])
def test_config_values_are_validated_by_the_config(make, pattern):
    with pytest.raises(advlab.AdvlabError, match=pattern):
        make()


def test_presets_are_config_instances_shared_with_the_old_names():
    assert VILLA.presets is VILLA_PRESETS is advlab.presets.PRESETS
    assert advlab.presets.VillaPreset is VILLAConfig
    assert all(isinstance(p, VILLAConfig) and p.name == n for n, p in VILLA_PRESETS.items())
    assert advlab.presets.get_preset("vcr-large").kl_reduction == "mean"
    assert SMART.presets is SMART_CONFIGS and VAT.presets is VAT_CONFIGS
    model = TinyVL()
    villa = VILLA(model, SITES, preset="vqa-large")
    assert villa.config is VILLA_PRESETS["vqa-large"]  # no override: the preset itself
    assert (villa.steps, villa.kl_weight, villa.mode) == (3, 1.0, "txt")
    alum = VAT.alum(model, SITES, stage="pretraining")
    assert alum.config == VAT_CONFIGS["alum-pretraining"]


def test_none_keeps_the_preset_value_as_the_old_none_defaults_did():
    model = TinyVL()
    assert VILLA(model, SITES, preset="vcr-base", step_size=None, steps=None).config is VILLA_PRESETS["vcr-base"]
    assert SMART(model, SITES, preset="paper", radius=None).config.radius == 1e-5
    assert FastAT(model, SITES, eps=0.1, step_size=None).step_size == pytest.approx(0.125)


def test_config_and_preset_together_and_unknown_presets_are_refused():
    model = TinyVL()
    with pytest.raises(advlab.AdvlabValueError, match="either `config` or `preset`"):
        VILLA(model, SITES, preset="paper", config=VILLAConfig())
    with pytest.raises(advlab.AdvlabValueError, match=r"`preset` to be one of \['alum-finetuning'"):
        VAT(model, SITES, preset="vat", eps=1.0)


@pytest.mark.parametrize("cls", [VAT, FastAT])
def test_a_missing_required_field_is_named(cls):
    with pytest.raises(advlab.AdvlabTypeError, match=rf"`{cls.__name__}` to get `eps`"):
        cls(TinyVL(), SITES)


@given(names=st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12), max_size=4))
def test_build_config_refuses_exactly_the_names_that_are_not_fields(names):
    fields = {f.name for f in dataclasses.fields(FreeLBConfig)}
    overrides = dict.fromkeys(names)  # None values: the defaults stay
    if set(names) <= fields:
        assert build_config("FreeLB", FreeLBConfig, {}, None, None, overrides) == FreeLBConfig()
    else:
        with pytest.raises(advlab.AdvlabTypeError, match="fields of FreeLBConfig"):
            build_config("FreeLB", FreeLBConfig, {}, None, None, overrides)


@given(steps=st.integers(1, 4), step_size=st.floats(0.0, 1.0), radius=st.one_of(st.none(), st.floats(1e-3, 1.0)))
def test_overrides_equal_dataclasses_replace(steps, step_size, radius):
    got = build_config("VILLA", VILLAConfig, VILLA_PRESETS, None, "paper",
                       {"steps": steps, "step_size": step_size, "radius": radius})
    want = dataclasses.replace(VILLA_PRESETS["paper"], steps=steps, step_size=step_size,
                               **({} if radius is None else {"radius": radius}))
    assert got == want


# ----------------------------------------------------------------------------------------- injected pieces
@pytest.mark.parametrize(("cls", "kw", "default"), [
    (R3F, {"eps": 0.05}, lambda c, p: advlab.symmetric_kl(c, p)),
    (TRADES, {"steps": 2, "step_size": 0.05}, lambda c, p: advlab.kl_divergence(c, p)),
    (SMART, {"preset": "paper", "steps": 2}, lambda c, p: advlab.symmetric_kl(p, c)),
], ids=["R3F", "TRADES", "SMART-paper"])
def test_an_injected_regularizer_equal_to_the_default_gives_the_same_bits_and_another_differs(cls, kw, default):
    batch = tiny_batch()
    model = TinyVL().double()
    runs = []
    for reg in (None, default, lambda c, p: advlab.js_divergence(c, p)):
        recipe = cls(model, SITES, regularizer=reg, generator=torch.Generator().manual_seed(1), **kw)
        runs.append(_step(recipe, model, batch))
    (g0, s0), (g1, s1), (g2, s2) = runs
    assert all(torch.equal(g0[n], g1[n]) for n in g0) and s0.kl == s1.kl
    assert s2.kl != s0.kl and any(not torch.equal(g0[n], g2[n]) for n in g0)


@pytest.mark.parametrize(("cls", "kw"), [(SMART, {"steps": 3}), (VAT, {"eps": 0.3, "steps": 3}),
                                         (TRADES, {"steps": 3})], ids=["SMART", "VAT", "TRADES"])
def test_the_ascent_regularizer_drives_only_the_delta_only_steps(cls, kw):
    """Called once per δ-only step with the clean side detached; the trained term is the regulariser."""
    batch = tiny_batch()
    model = TinyVL().double()
    seen = []

    def ascent(clean, perturbed):
        seen.append(clean.requires_grad)
        return advlab.kl_divergence(clean, perturbed)

    recipe = cls(model, SITES, ascent_regularizer=ascent, generator=torch.Generator().manual_seed(2), **kw)
    _step(recipe, model, batch)
    assert seen == [False, False, False]


def test_vat_regularizer_replaces_the_divergence_and_refuses_both():
    with pytest.raises(advlab.AdvlabValueError, match="regularizer.*divergence.*both"):
        VAT(TinyVL(), SITES, eps=0.1, divergence="kl", regularizer=lambda c, p: advlab.kl_divergence(c, p))


@pytest.mark.parametrize(("cls", "kw"), [(TRADES, {}), (FastAT, {"eps": 0.1})], ids=["TRADES", "FastAT"])
def test_trades_and_fast_at_take_an_injected_ascender(cls, kw):
    batch = tiny_batch()
    model = TinyVL().double()
    moves = []

    def ascender(delta, grad, *, mask=None, generator=None):
        moves.append(grad.shape)
        return delta + 0.01 * grad.sign()

    _step(cls(model, SITES, ascender=ascender, generator=torch.Generator().manual_seed(0), **kw), model, batch)
    assert len(moves) == 2  # one δ-only step, two modalities
    with pytest.raises(advlab.AdvlabValueError, match="ascender.*step_size.*both"):
        cls(model, SITES, ascender=ascender, step_size=0.1, **kw)
