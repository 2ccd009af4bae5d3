"""Registries, user extensions (decorator and entry points), and one smoke test per component."""

from __future__ import annotations

import math
import re
import sys
import textwrap
import warnings

import pytest
import torch

import metaadamw
from metaadamw import FEATURES, GROUPINGS, OBJECTIVES, WEIGHTINGS, MetaAdamW, Registry, UnknownComponentError
from metaadamw.features import FeatureExtractor
from tests.metaadamw.helpers import (TinyConvNet, TinyTransformer, conv_batches, conv_loss, lm_batches, lm_loss, mlp, mse,
                                     regression_batches, small_kwargs)


def test_registry_is_a_dict_behind_a_decorator():
    reg = Registry("widget", export_name="WIDGETS")

    @reg.register("a_one")
    def a():
        return 1

    @reg.register
    def b_two():
        return 2

    assert reg.list() == ["a_one", "b_two"] and reg.list("a_*") == ["a_one"]
    assert reg.create("b_two") == 2 and "a_one" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a_one", lambda: 3)
    reg.add("a_one", lambda: 3, override=True)
    with pytest.raises(KeyError) as err:
        reg.get("c_three")
    assert isinstance(err.value, UnknownComponentError)
    assert "unknown widget 'c_three'. Registered: a_one, b_two" in str(err.value)
    assert "@WIDGETS.register(\"c_three\")" in str(err.value)
    with pytest.raises(KeyError, match="Did you mean 'b_two'") as err:  # a misspelling
        reg.get("b_tow")
    # the registration example does not suggest registering the misspelt name
    assert "To add a new one, decorate it with @WIDGETS.register(\"<name>\")" in str(err.value)
    assert "b_tow\")" not in str(err.value)


def test_list_helpers_and_builtin_names():
    # (plugins imported by other tests of this process may have added names: the built-ins must be there)
    names = metaadamw.list_features()
    assert names == sorted(names) and {"basic", "basic_plus", "enhanced", "norm_basic", "norm_basic_plus"} <= set(names)
    assert metaadamw.list_features("norm_*") == ["norm_basic", "norm_basic_plus"]
    assert {"fine_grained", "original"} <= set(metaadamw.list_groupings())
    assert {"combined", "gen_gap", "gradient", "loss_decrease"} <= set(metaadamw.list_objectives())
    assert {"fixed", "huw", "huw_priority", "sum"} <= set(metaadamw.list_weightings())


@pytest.fixture
def custom_extractor():
    @FEATURES.register("test_grad_only")
    class GradOnly(FeatureExtractor):
        stats = ("grad_norm", "cos")

        def columns(self):
            return ["grad_norm", "cos"]

        def statistics(self, stats):
            return self.group_mean(torch.stack([stats["grad_norm"], stats["cos"]], 1))

    yield "test_grad_only"
    FEATURES.remove("test_grad_only")


def test_user_feature_extractor_end_to_end(custom_extractor):
    model = TinyTransformer()
    opt = MetaAdamW(model.named_parameters(), features=custom_extractor, second_moment=False, modulator_heads=3,
                    **small_kwargs())
    assert opt.modulator.extractor.feature_names == ["grad_norm", "cos", "time"] and opt.modulator.width == 3
    batches = lm_batches()
    lm_loss(model, batches[0]).backward()
    opt.step()
    assert not opt.meta_step(model, lm_loss, *batches).skipped


def test_mistakes_in_a_user_feature_extractor_are_named():
    # a class that is not a FeatureExtractor failed with AttributeError: 'width'; a statistic read but not
    # declared with a bare KeyError; one column too many with second_moment=True was taken as v_norm
    class Plain:
        def __init__(self, layout, **kwargs):
            pass

    class Undeclared(FeatureExtractor):
        stats = ("grad_norm",)

        def columns(self):
            return ["grad_norm", "param_norm"]

        def statistics(self, stats):
            return self.group_mean(torch.stack([stats["grad_norm"], stats["param_norm"]], 1))

    class OneTooMany(FeatureExtractor):
        stats = ("grad_norm", "cos")

        def columns(self):
            return ["grad_norm"]

        def statistics(self, stats):
            return self.group_mean(torch.stack([stats["grad_norm"], stats["cos"]], 1))

    model = mlp(0)
    batch = regression_batches(1)[0]
    try:
        FEATURES.add("test_plain", Plain)
        with pytest.raises(ValueError, match=r"features 'test_plain' gave .*Plain.*, which is not a feature extractor: "
                                             r"subclass metaadamw.features.FeatureExtractor"):
            MetaAdamW(model.named_parameters(), features="test_plain", **small_kwargs())
        for name, cls, message in (
                ("test_undeclared", Undeclared, r"Undeclared.statistics\(\) read stats\['param_norm'\], which its "
                                                r"stats = \('grad_norm',\) does not declare.*Add 'param_norm' to "
                                                r"Undeclared.stats"),
                ("test_one_too_many", OneTooMany, r"OneTooMany.statistics\(\) returned a tensor of shape \(\d+, 2\); "
                                                  r"expected \(\d+, 1\).*If its last column is the group mean of "
                                                  r"v_norm, set includes_v_norm = True on the class")):
            FEATURES.add(name, cls)
            opt = MetaAdamW(model.named_parameters(), features=name, modulator_heads=1, **small_kwargs())
            mse(model, batch).backward()
            with pytest.raises(ValueError, match=message):
                opt.step()
            model.zero_grad()
    finally:
        for name in ("test_plain", "test_undeclared", "test_one_too_many"):
            FEATURES.remove(name)


def test_an_unknown_name_that_is_not_a_string_gets_a_placeholder_in_the_registration_example():
    with pytest.raises(KeyError) as err:
        FEATURES.get(None)
    assert '@FEATURES.register("<name>")' in str(err.value) and '"None"' not in str(err.value)


def _fake_distribution(site, name: str, entry_points: str) -> None:
    """An installed distribution ``name`` in ``site`` (a dist-info folder) with ``entry_points.txt``."""
    dist = site / f"{name}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)


def test_entry_points_contribute_components(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "entry_point_plugin").mkdir(parents=True)
    (pkg / "entry_point_plugin" / "__init__.py").write_text(textwrap.dedent("""
        import torch
        from metaadamw.features import FeatureExtractor

        class Constant(FeatureExtractor):
            stats = ()
            def columns(self):
                return ["one"]
            def statistics(self, stats):
                return torch.ones(self.layout.num_groups, 1)
    """))
    _fake_distribution(pkg, "entry_point_plugin", "[metaadamw.features]\nconstant_feature = entry_point_plugin:Constant\n")
    monkeypatch.syspath_prepend(str(pkg))
    reg = Registry("feature extractor", "metaadamw.features")
    assert "constant_feature" in reg.list()
    monkeypatch.setattr(FEATURES, "_entry_points_loaded", False)
    try:
        assert "constant_feature" in FEATURES.list()
    finally:
        FEATURES.remove("constant_feature")
        sys.modules.pop("entry_point_plugin", None)


def test_an_entry_point_never_replaces_a_registered_name(tmp_path, monkeypatch):
    # duplicate names are an error for decorators; an installed package's entry point with a name
    # that is taken (a built-in, or the user's own registration) is ignored with a warning
    (tmp_path / "shadow_plugin.py").write_text("class Shadow:\n    pass\n")
    _fake_distribution(tmp_path, "shadow_plugin", "[metaadamw.features]\nbasic = shadow_plugin:Shadow\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("feature extractor", "metaadamw.features")
    mine = object()
    reg.add("basic", mine)
    try:
        with pytest.warns(RuntimeWarning, match="entry point 'basic'.*is ignored: that name is already registered"):
            assert reg.get("basic") is mine
    finally:
        sys.modules.pop("shadow_plugin", None)


def test_broken_entry_point_warns_and_hides_nothing(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "broken", "[metaadamw.groupings]\nbad = does_not_exist_mod:thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("grouping strategy", "metaadamw.groupings")
    reg.add("fine", object())
    with pytest.warns(RuntimeWarning, match="could not load grouping strategy entry point 'bad'"):
        assert reg.list() == ["fine"]
    # a lookup of None (grouping=None) is not one of a name that the broken entry point exposes: it said
    # "unknown grouping strategy None: the entry point 'bad' ... could not be loaded"
    with pytest.raises(KeyError) as err:
        reg.get(None)
    assert str(err.value).startswith("unknown grouping strategy None. Registered: fine. To add one, decorate it")
    assert str(err.value).endswith("Not loaded (a module that would have registered it?): the entry point 'bad' "
                                   "(does_not_exist_mod:thing) of group 'metaadamw.groupings' could not be loaded: "
                                   "ModuleNotFoundError: No module named 'does_not_exist_mod'.")


def test_an_entry_point_that_is_not_callable_is_ignored_with_the_reason(tmp_path, monkeypatch):
    (tmp_path / "string_plugin.py").write_text("NOT_A_COMPONENT = 'basic'\n")
    _fake_distribution(tmp_path, "string_plugin", "[metaadamw.objectives]\nstringy = string_plugin:NOT_A_COMPONENT\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(OBJECTIVES, "_entry_points_loaded", False)
    try:
        with pytest.warns(RuntimeWarning, match="entry point 'stringy'.*ignored: it is of type str, not a class, function"):
            assert "stringy" not in OBJECTIVES.list()
    finally:
        sys.modules.pop("string_plugin", None)


def test_entry_point_warnings_point_at_the_users_line(tmp_path, monkeypatch):
    # they pointed into metaadamw (optimizer.py for MetaAdamW(...), __init__.py for list_features(),
    # registry.py for len(FEATURES)): whichever of its functions made the first lookup
    (tmp_path / "mixed_plugin.py").write_text("NOT_A_COMPONENT = 'x'\nclass Shadow:\n    pass\n")
    _fake_distribution(tmp_path, "mixed_plugin", "[metaadamw.features]\nbroken_one = does_not_exist_mod:thing\n"
                                                 "stringy_one = mixed_plugin:NOT_A_COMPONENT\nbasic = mixed_plugin:Shadow\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lookups = [lambda: MetaAdamW(mlp(0).named_parameters(), **small_kwargs(features="basic")),
               lambda: metaadamw.list_features(), lambda: len(FEATURES)]
    try:
        for lookup in lookups:
            monkeypatch.setattr(FEATURES, "_entry_points_loaded", False)
            monkeypatch.setattr(FEATURES, "_entry_point_problems", {}, raising=False)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                lookup()
            said = [w for w in caught if "entry point" in str(w.message)]
            assert len(said) == 3, [str(w.message) for w in caught]
            assert all(w.filename == __file__ for w in said), [(w.filename, str(w.message)[:40]) for w in said]
    finally:
        sys.modules.pop("mixed_plugin", None)


class _Extra(metaadamw.MetaObjective):
    """The loss decrease, plus a term returned as the test asks."""
    terms = ("loss_decrease",)
    signed_terms = frozenset(terms)
    needs_val = True

    def __init__(self, returned=None):
        self.returned = returned

    def __call__(self, q):
        out = {"loss_decrease": q.loss_val_prime - q.loss_val}
        return out if self.returned is None else self.returned(out, q)


def _meta_step_with(objective=None, weighting="huw", grouping=None, features="basic", **kwargs):
    model = TinyTransformer()
    kwargs.update({} if grouping is None else {"grouping": grouping})
    opt = MetaAdamW(model.named_parameters(), objective=objective or "combined", weighting=weighting,
                    features=features, **small_kwargs(**kwargs))
    batches = lm_batches()
    lm_loss(model, batches[0]).backward()
    opt.step()
    return opt.meta_step(model, lm_loss, *batches)


@pytest.mark.parametrize("returned, error", [
    (lambda out, q: {"other": out["loss_decrease"]}, r"_Extra declares the terms \('loss_decrease',\).*without \['loss_decrease'\]"),
    (lambda out, q: {"loss_decrease": q.loss_val_prime * torch.ones(3)}, r"terms \['loss_decrease'\] are not scalar tensors \(got a tensor of shape \(3,\)\)"),
    (lambda out, q: [out["loss_decrease"]], r"must return a dict of its terms"),
])
def test_what_a_user_objective_returns_is_checked_naming_it(returned, error):
    OBJECTIVES.add("test_extra", _Extra(returned))  # an instance is used as it is, not called to make one
    try:
        with pytest.raises((ValueError, TypeError), match=error):
            _meta_step_with("test_extra")
    finally:
        OBJECTIVES.remove("test_extra")


def test_a_weighting_registered_as_a_plain_function_is_told_what_to_register():
    from metaadamw import WEIGHTINGS

    WEIGHTINGS.add("test_plain_weighting", lambda terms, signed, **options: None)
    try:
        with pytest.raises(ValueError, match=r"weighting 'test_plain_weighting' gave None, which is not a loss "
                                             r"weighting: subclass metaadamw.Weighting"):
            MetaAdamW(TinyTransformer().named_parameters(), weighting="test_plain_weighting", **small_kwargs())
    finally:
        WEIGHTINGS.remove("test_plain_weighting")


def test_an_objective_reading_validation_quantities_without_needs_val_is_told_to_declare_it():
    class NoVal(metaadamw.MetaObjective):
        terms = ("v",)

        def __call__(self, q):
            return {"v": q.loss_val_prime}  # None: the meta-update computes no validation pass for it

    OBJECTIVES.add("test_noval", NoVal)
    try:
        with pytest.raises(ValueError, match=r"terms \['v'\] are not scalar tensors \(got None\).*needs_val = True"):
            _meta_step_with("test_noval")
    finally:
        OBJECTIVES.remove("test_noval")


def test_objectives_register_as_classes_instances_or_factories_and_may_record_extra_terms():
    extra = _Extra(lambda out, q: {**out, "val_prime": q.loss_val_prime})
    for name, obj in (("test_cls", _Extra), ("test_inst", extra), ("test_factory", lambda: extra)):
        OBJECTIVES.add(name, obj)
        try:
            record = _meta_step_with(name)
        finally:
            OBJECTIVES.remove(name)
        assert list(record.sigmas) == ["loss_decrease"] and math.isfinite(record.terms["loss_decrease"])
        assert ("val_prime" in record.terms) == (name != "test_cls")
    OBJECTIVES.add("test_function", lambda q: {"x": q.loss_val})  # a bare function declares nothing
    try:
        with pytest.raises(ValueError, match=r"objective 'test_function' gave .* not a meta objective.*"
                                             r"Subclass metaadamw.MetaObjective"):
            _meta_step_with("test_function")
    finally:
        OBJECTIVES.remove("test_function")


def test_what_a_user_weighting_or_grouping_returns_is_checked_naming_it():
    class Bare(metaadamw.Weighting):
        def forward(self, terms):
            return torch.stack(list(terms.values())).sum()  # the loss alone, no sigmas

    WEIGHTINGS.add("test_bare", Bare)
    try:
        with pytest.raises(TypeError, match=r"weighting Bare must return \(meta-loss .*\), got a tensor of shape \(\)"):
            _meta_step_with(weighting="test_bare")
    finally:
        WEIGHTINGS.remove("test_bare")
    for name, strategy, got in (("test_short", lambda infos: ["all"], r"a list of 1 \('all'\)"),
                                ("test_ints", lambda infos: [0] * len(infos), r"a list of \d+ \(0, 0, 0, 0, ...\)")):
        GROUPINGS.add(name, strategy)
        try:
            with pytest.raises(ValueError, match=rf"grouping '{name}' must return one group name \(a str\) per "
                                                 rf"parameter tensor, \d+ in all, got {got}"):
                _meta_step_with(grouping=name)
        finally:
            GROUPINGS.remove(name)


def test_a_user_weighting_whose_sigmas_are_not_tensors_is_told_to_return_tensors():
    class FloatSigmas(metaadamw.Weighting):
        def forward(self, terms):  # sigmas as Python floats: the record crashed with "'float' has no attribute 'detach'"
            return torch.stack([terms[t] for t in self.terms]).sum(), {t: 1.0 for t in self.terms}

    WEIGHTINGS.add("test_float_sigmas", FloatSigmas)
    try:
        with pytest.raises(TypeError, match=r"weighting FloatSigmas must return its sigmas as scalar tensors .*"
                                            r"got for \['loss_decrease'\]: 1.0"):
            _meta_step_with("loss_decrease", weighting="test_float_sigmas")
    finally:
        WEIGHTINGS.remove("test_float_sigmas")


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_a_user_objective_or_weighting_that_cuts_the_graph_is_named(meta_gradient):
    class Detached(metaadamw.MetaObjective):
        terms = ("v",)
        needs_val = True

        def __call__(self, q):  # trained nothing in silence (finite differences) or blamed the model (exact)
            return {"v": q.loss_val_prime.detach()}

    class Itemised(metaadamw.Weighting):
        def forward(self, terms):  # failed with autograd's "element 0 of tensors does not require grad"
            return torch.tensor(sum(v.item() for v in terms.values())), {}

    OBJECTIVES.add("test_detached", Detached)
    WEIGHTINGS.add("test_itemised", Itemised)
    try:
        with pytest.raises(ValueError, match=r"objective Detached: none of its terms \('v',\) depends on the "
                                             r"modulator through autograd.*no \.detach\(\)"):
            _meta_step_with("test_detached", weighting="sum", meta_gradient=meta_gradient)
        with pytest.raises(TypeError, match=r"weighting Itemised returned a meta-loss that does not depend on the "
                                            r"terms through autograd.*\.item\(\)"):
            _meta_step_with("loss_decrease", weighting="test_itemised", meta_gradient=meta_gradient)
    finally:
        OBJECTIVES.remove("test_detached")
        WEIGHTINGS.remove("test_itemised")


def test_a_feature_extractor_whose_statistics_do_not_match_its_columns_is_named():
    @FEATURES.register("test_off_by_one")
    class OffByOne(FeatureExtractor):
        stats = ("grad_norm",)

        def columns(self):
            return ["grad_norm", "twice"]

        def statistics(self, stats):
            return self.group_mean(stats["grad_norm"].unsqueeze(1))  # one column, not two

    try:
        with pytest.raises(ValueError, match=r"OffByOne.statistics\(\) returned a tensor of shape \(\d+, 1\); "
                                             r"expected \(\d+, 2\).*\['grad_norm', 'twice'\]$"):
            _meta_step_with(features="test_off_by_one")
    finally:
        FEATURES.remove("test_off_by_one")


def test_a_feature_extractor_whose_stats_is_a_str_is_named():
    # stats = ("grad_norm") is the str 'grad_norm': its letters were named as unknown statistics
    class NoComma(FeatureExtractor):
        stats = ("grad_norm")

        def columns(self):
            return ["grad_norm"]

        def statistics(self, stats):
            return self.group_mean(stats["grad_norm"].unsqueeze(1))

    FEATURES.add("test_no_comma", NoComma)
    try:
        with pytest.raises(ValueError, match=re.escape("NoComma.stats must be a tuple of statistic names, got the "
                                                       "str 'grad_norm'; a tuple of one name needs its comma: "
                                                       "('grad_norm',)")):
            MetaAdamW(mlp(0).named_parameters(), features="test_no_comma", modulator_heads=1, **small_kwargs())
    finally:
        FEATURES.remove("test_no_comma")


def test_priorities_none_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"priorities must be three finite non-negative numbers.*got None"):
        MetaAdamW(TinyTransformer().parameters(), grouping="original", priorities=None)


# --- one shared smoke test for every registered component ------------------------------------

def _smoke(model, loss_fn, batches, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MetaAdamW(model.named_parameters(), model=model, lr=1e-3, **small_kwargs(**kwargs))
    before = [p.detach().clone() for p in model.parameters()]
    for b in batches:
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()
    record = opt.meta_step(model, loss_fn, *batches[:3])
    opt.meta_step(model, loss_fn, *batches[:3])
    assert not record.skipped and math.isfinite(record.meta_loss)
    assert all(0.5 <= a <= 1.5 for a in record.alpha + record.beta)
    assert len(record.alpha) == len(opt.group_names) == opt.layout.num_groups
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in list(model.parameters()) + opt.meta_parameters())
    return opt, record


@pytest.mark.parametrize("features", FEATURES.list())
@pytest.mark.parametrize("gating", [False, True])
def test_every_feature_extractor(features, gating):
    _smoke(TinyTransformer(), lm_loss, lm_batches(), features=features, gating=gating, modulator_heads=1)


@pytest.mark.parametrize("grouping", GROUPINGS.list())
def test_every_grouping(grouping):
    opt, _ = _smoke(TinyConvNet(), conv_loss, conv_batches(), grouping=grouping)
    assert len(set(opt.group_names)) == len(opt.group_names) >= 1


@pytest.mark.parametrize("objective", OBJECTIVES.list())
@pytest.mark.parametrize("weighting", WEIGHTINGS.list())
@pytest.mark.parametrize("form", ["regression", "classification"])
def test_every_objective_and_weighting(objective, weighting, form):
    opt, record = _smoke(TinyTransformer(), lm_loss, lm_batches(), objective=objective, weighting=weighting,
                         weighting_form=form, fixed_weights=[0.5, 2.0, 1.0])
    assert set(record.terms) == set(opt.objective.terms)
    if weighting.startswith("huw"):
        assert set(record.sigmas) == set(record.terms)


def test_a_non_callable_component_is_refused_when_registered():
    from metaadamw import FEATURES

    with pytest.raises(TypeError, match="cannot register 'three' as a feature extractor: it is of type int"):
        FEATURES.add("three", 3)
    assert "three" not in FEATURES.list()


def test_the_same_definition_registered_again_replaces_the_first():
    # a plugin module imported again after an import that failed half-way (Ray workers retry from the
    # study's folder), or a notebook cell run again: its classes are new objects of the same
    # definition, which clashed with the first ("already registered")
    reg = Registry("widget", export_name="WIDGETS")
    source = "@reg.register('w')\nclass Widget:\n    pass\n"
    first, second = {"reg": reg, "__name__": "plugin_mod"}, {"reg": reg, "__name__": "plugin_mod"}
    exec(source, first)
    exec(source, second)
    assert reg.get("w") is second["Widget"] is not first["Widget"]
    with pytest.raises(ValueError, match=r"already registered \(plugin_mod.Widget\)"):  # another module's: a clash
        exec(source, {"reg": reg, "__name__": "other_mod"})
    # so for an instance registered as an object (objectives may be): its class defines it
    source = "class Inst:\n    pass\n\nreg.register('i')(Inst())\n"
    first, second = {"reg": reg, "__name__": "cell_mod"}, {"reg": reg, "__name__": "cell_mod"}
    exec(source, first)
    exec(source, second)
    assert type(reg.get("i")) is second["Inst"] is not first["Inst"]
    with pytest.raises(ValueError, match=r"already registered \(cell_mod.Inst\)"):
        exec(source, {"reg": reg, "__name__": "other_mod"})
    import functools  # (a general-purpose object says nothing of where it was made: a clash)

    reg.register("p")(functools.partial(print, 1))
    with pytest.raises(ValueError, match="already registered"):
        reg.register("p")(functools.partial(print, 2))


def test_the_registry_docs_say_that_the_same_definition_registered_again_replaces_the_first():
    # the module docstring said "Registering a name twice is an error", which the test above contradicts
    import metaadamw.registry

    doc = " ".join(metaadamw.registry.__doc__.split())
    assert "Registering a name twice is an error" not in doc
    assert ("except for the same definition made again - the same module and qualified name, as a notebook cell "
            "run again or a plugin module imported again makes it -, which replaces the first") in doc


def test_an_unknown_name_exposed_by_a_broken_entry_point_names_that_entry_point(tmp_path, monkeypatch):
    # a package that exposes "fancy" through an entry point whose module fails to import: the error says
    # so (the warning may have gone to a log, once), instead of advising to expose it through an entry point
    (tmp_path / "broken_fancy.py").write_text("import a_dependency_that_is_not_installed\n")
    _fake_distribution(tmp_path, "broken_fancy", "[metaadamw.features]\nfancy = broken_fancy:Fancy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(FEATURES, "_entry_points_loaded", False)
    monkeypatch.setattr(FEATURES, "_entry_point_problems", {}, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyError, match=r"unknown feature extractor 'fancy': the entry point 'fancy' "
                                           r"\(broken_fancy:Fancy\) of group 'metaadamw.features' could not be loaded: "
                                           r"ModuleNotFoundError: .*a_dependency_that_is_not_installed") as err:
            MetaAdamW(TinyTransformer().named_parameters(), features="fancy", **small_kwargs())
        assert "expose it through" not in str(err.value)
        # another unknown name: the broken entry point is mentioned as one that might have registered it
        with pytest.raises(KeyError, match=r"unknown feature extractor 'other'.*Not loaded.*entry point 'fancy'"):
            FEATURES.get("other")
    sys.modules.pop("broken_fancy", None)


def test_a_component_missing_its_method_is_told_which_one():
    # a bare NotImplementedError (empty message) said nothing in a trial's error column
    class NoColumns(FeatureExtractor):
        stats = ("grad_norm",)

        def statistics(self, stats):
            return self.group_mean(stats["grad_norm"].unsqueeze(1))

    class NoStatistics(FeatureExtractor):
        stats = ("grad_norm",)

        def columns(self):
            return ["g"]

    class NoCall(metaadamw.MetaObjective):
        terms = ("v",)
        needs_val = True

    class NoForward(metaadamw.Weighting):
        pass

    cases = ((FEATURES, "test_no_columns", NoColumns, "features", r"NoColumns must implement columns\(\)"),
             (FEATURES, "test_no_statistics", NoStatistics, "features", r"NoStatistics must implement statistics\("),
             (OBJECTIVES, "test_no_call", NoCall, "objective", r"NoCall must implement __call__\(self, q\)"),
             (WEIGHTINGS, "test_no_forward", NoForward, "weighting", r"NoForward must implement forward\(self, terms\)"))
    for registry, name, cls, option, message in cases:
        registry.add(name, cls)
        try:
            with pytest.raises(NotImplementedError, match=message):
                model = TinyTransformer()
                opt = MetaAdamW(model.named_parameters(), **{option: name}, **small_kwargs())
                batches = lm_batches()
                lm_loss(model, batches[0]).backward()
                opt.step()
                opt.meta_step(model, lm_loss, *batches)
        finally:
            registry.remove(name)


def test_register_refuses_an_empty_name_instead_of_using_the_class_name():
    class Unnamed(FeatureExtractor):
        pass

    try:
        with pytest.raises(ValueError, match="names must be non-empty strings, got ''"):
            FEATURES.register("")(Unnamed)
        assert "Unnamed" not in FEATURES.list()
    finally:
        FEATURES.remove("Unnamed")


class _WrongFeatures(metaadamw.features.Basic):
    def __init__(self, layout):  # (MetaAdamW passes time_step= and second_moment= too)
        super().__init__(layout)


class _WrongObjective(metaadamw.objectives.Combined):
    def __init__(self, scale):  # (a registered class is instantiated with no arguments)
        super().__init__()


class _WrongWeighting(metaadamw.weighting.Sum):
    def __init__(self, terms):  # (MetaAdamW passes signed_terms, priorities=, weights=, form= too)
        super().__init__(terms)


def _wrong_grouping(tensors, model):  # (a grouping is called with the tensors alone)
    return ["all"] * len(tensors)


_WRONG_SIGNATURES = [
    (FEATURES, "features", _WrongFeatures, r"cls\(layout, \*, time_step, second_moment\)"),
    (GROUPINGS, "grouping", _wrong_grouping, r"fn\(tensors: list\[TensorInfo\]\)"),
    (OBJECTIVES, "objective", _WrongObjective, r"cls\(\) with no arguments"),
    (WEIGHTINGS, "weighting", _WrongWeighting, r"cls\(terms, signed_terms, \*, priorities, weights, form\)"),
]


@pytest.mark.parametrize("registry, option, component, expected", _WRONG_SIGNATURES, ids=[w[1] for w in _WRONG_SIGNATURES])
def test_a_component_with_the_wrong_signature_is_named_with_the_call_expected(registry, option, component, expected):
    # a bare TypeError ("__init__() got an unexpected keyword argument 'time_step'") named neither the
    # registered component nor how MetaAdamW calls it; ablate's study load let it through, and every trial failed
    from ablate.config import ConfigError, resolve_config

    registry.add("test_wrong_signature", component)
    try:
        with pytest.raises(TypeError, match=rf"MetaAdamW: the {registry.kind} 'test_wrong_signature' "
                                            rf"\(.*{component.__qualname__}\(.*\)\) cannot be called as MetaAdamW "
                                            rf"calls it, {expected}"):
            MetaAdamW(mlp().named_parameters(), **{option: "test_wrong_signature"}, **small_kwargs())
        with pytest.raises(ConfigError, match=rf"{option}='test_wrong_signature': the {registry.kind} "
                                              rf"'test_wrong_signature' .* cannot be called as MetaAdamW calls it"):
            resolve_config({"task": "etth1", option: "test_wrong_signature"})
    finally:
        registry.remove("test_wrong_signature")


class _NotAModuleWeighting:  # the call MetaAdamW makes, but no nn.Module (metaadamw.Weighting)
    def __init__(self, terms, signed_terms=(), *, priorities=None, weights=None, form="regression"):
        self.terms = terms

    def __call__(self, terms):
        return sum(terms.values()), {}


class _NotAnExtractor:  # the call MetaAdamW makes, but no metaadamw.features.FeatureExtractor
    def __init__(self, layout, *, time_step=True, second_moment=True):
        pass


@pytest.mark.parametrize("registry, option, component, expected", [
    (WEIGHTINGS, "weighting", _NotAModuleWeighting, r"subclass metaadamw.Weighting"),
    (FEATURES, "features", _NotAnExtractor, r"subclass metaadamw.features.FeatureExtractor"),
], ids=["weighting", "features"])
def test_a_component_class_of_the_wrong_kind_is_refused_when_a_study_is_loaded(registry, option, component, expected):
    # MetaAdamW refuses such a class once made, so every trial of a study failed in its worker, while the
    # study file's check (resolve_config) let it through: it is refused there too, once, naming the fix
    from ablate.config import ConfigError, resolve_config

    registry.add("test_wrong_kind", component)
    try:
        with pytest.raises(ConfigError, match=rf"{option}='test_wrong_kind': the {registry.kind} 'test_wrong_kind' "
                                              rf"\(.*{component.__qualname__}\) is not a {registry.kind} .*{expected}"):
            resolve_config({"task": "etth1", option: "test_wrong_kind"})
    finally:
        registry.remove("test_wrong_kind")


def test_a_name_that_differs_only_in_case_is_the_only_one_suggested():
    # Registry.get("ETTh1") suggested 'etth1', 'ettm1': the name meant differs from the first only in case
    reg = Registry("widget", "tests.widgets")
    for name in ("etth1", "etth2", "ettm1", "ettm2"):
        reg.add(name, lambda: 1)
    for asked, meant in [("ETTh1", "etth1"), ("ETTM2", "ettm2")]:
        with pytest.raises(UnknownComponentError) as err:
            reg.get(asked)
        assert re.search(r"Did you mean [^?]*\?", str(err.value)).group() == f"Did you mean {meant!r}?"
    with pytest.raises(UnknownComponentError) as err:  # (no name differs only in case: the close ones, sorted)
        reg.get("etth")
    assert re.search(r"Did you mean [^?]*\?", str(err.value)).group() == "Did you mean 'etth1' or 'etth2'?"
    mixed = Registry("widget", "tests.widgets")
    mixed.add("MyWidget", lambda: 1)
    mixed.add("my_widget", lambda: 1)
    with pytest.raises(UnknownComponentError, match=r"Did you mean 'MyWidget'\?"):
        mixed.get("mywidget")


def test_a_registry_and_ablate_s_messages_suggest_the_same_names_for_a_misspelt_one():
    # Registry.get and ablate.config.did_you_mean had rules of their own: Registry.get("etth") suggested
    # 'etth2', 'etth1' (difflib's two closest, in its order) where a study file's `task: etth` was told 'etth1' or
    # 'etth2'; Registry.get("norm") 'norm_basic', 'norm_basic_plus' (names containing it) where `features: norm` got
    # no suggestion; a second name less close than the first ('b_twos' beside 'b_two') was suggested beside it; and
    # did_you_mean kept one of two options differing only in case from each other
    from ablate.config import did_you_mean
    from ablate.tasks import TASKS
    from metaadamw.registry import suggestion

    def registry_hint(registry: Registry, name: str) -> str:
        with pytest.raises(UnknownComponentError) as err:
            registry.get(name)
        found = re.search(r"Did you mean ([^?]*)\?", str(err.value))
        return found.group(1) if found else ""

    widgets = Registry("widget", "tests.widgets")
    for name in ("b_two", "b_twos", "Foo", "FOO", "etth1", "etth2", "ettm1"):
        widgets.add(name, lambda: 1)
    cases = [(GROUPINGS, "fine_graned", "'fine_grained'"), (TASKS, "ETTh1", "'etth1'"),
             (TASKS, "etth", "'etth1' or 'etth2'"), (TASKS, "ettm", "'ettm1' or 'ettm2'"), (FEATURES, "norm", ""),
             (FEATURES, "basic_pls", "'basic_plus'"), (widgets, "b_tow", "'b_two'"), (widgets, "foo", "'FOO' or 'Foo'"),
             (widgets, "ETTH", "'etth1' or 'etth2'"), (widgets, "zzz", "")]
    for registry, name, expected in cases:
        assert suggestion(name, registry.list()) == expected, name
        assert registry_hint(registry, name) == expected, name
        assert did_you_mean(name, registry.list()) == (f" (did you mean {expected}?)" if expected else ""), name
