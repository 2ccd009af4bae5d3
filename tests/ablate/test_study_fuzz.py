"""Property-based tests of the study-file parser: whatever it is given - arbitrary YAML-like
structures, mutations of search_spaces/quick.yaml, random or damaged YAML text, raw bytes - it
returns a Study or raises StudyError, never anything else."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ablate.study
from ablate.config import COMMON_FIELDS
from ablate.study import FACTORIAL_KEYS, STUDY_KEYS, Study, StudyError, load_study, parse_study
from tests.ablate.test_study import PAPER_TASKS, SEARCH_SPACES, TINY_TASKS, stand_in_components, stand_in_tasks

QUICK = yaml.safe_load((SEARCH_SPACES / "quick.yaml").read_text())
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def registries_and_no_imports():
    """Stand-ins for unregistered tasks and components; plugin imports refused (random module
    names must never import real modules); a lower trial limit so that no example is slow."""
    with stand_in_components(), stand_in_tasks({**{t: {"defaults": {}} for t in PAPER_TASKS}, **TINY_TASKS}):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ablate.study, "import_module", refuse_import)
            patch.setattr(ablate.study, "MAX_TRIALS", 2_000)
            yield


def refuse_import(name: str):
    raise ModuleNotFoundError(f"the fuzz tests import no plugins ({name})")


@pytest.fixture(scope="module")
def study_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"


# -- strategies ----------------------------------------------------------------------------

NAMES = sorted(
    set(STUDY_KEYS) | set(COMMON_FIELDS) | set(FACTORIAL_KEYS)
    | {"cpus", "gpus", "none", "small", "basic", "basic_plus", "original", "sum", "huw", "C=AB", "embedded", "real", *PAPER_TASKS}
)
KEYS = st.one_of(st.sampled_from(NAMES), st.text(max_size=8))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 12), st.floats(), st.text(max_size=12), st.sampled_from(NAMES)
)
VALUES = st.recursive(
    SCALARS, lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4), max_leaves=16
)
# studies with the required keys in place, so that validation gets past the first checks
STUDIES = st.fixed_dictionaries(
    {"name": st.just("fuzz"), "tasks": st.sampled_from([["etth1"], ["tiny_ts", "tiny_cls"]]), "seeds": st.integers(1, 3)},
    optional={key: VALUES for key in STUDY_KEYS if key not in ("name", "tasks", "seeds", "plugins")},
)


def parses_or_study_error(call, *args, **kwargs) -> None:
    try:
        result = call(*args, **kwargs)
    except StudyError:
        return
    assert isinstance(result, Study)


# -- arbitrary structures ------------------------------------------------------------------


@FUZZ
@given(VALUES)
def test_arbitrary_structures(value):
    parses_or_study_error(parse_study, value)


@FUZZ
@given(STUDIES)
def test_arbitrary_values_under_the_study_keys(mapping):
    parses_or_study_error(parse_study, mapping)


# -- mutations of quick.yaml ---------------------------------------------------------------


def paths(obj, prefix=()):
    """Every path (a tuple of keys and indices) into a nested structure, the root first."""
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from paths(value, prefix + (i,))


def at(obj, path):
    for step in path:
        obj = obj[step]
    return obj


def mutate(data, mapping) -> None:
    """Delete a key or item, replace a value with a random one, or insert a random key."""
    path = data.draw(st.sampled_from(list(paths(mapping))))
    target = at(mapping, path)
    operation = data.draw(st.sampled_from(["delete", "replace", "insert"]))
    if operation == "insert" and isinstance(target, dict):
        target[data.draw(KEYS)] = data.draw(VALUES)
    elif operation == "insert" and isinstance(target, list):
        target.insert(data.draw(st.integers(0, len(target))), data.draw(VALUES))
    elif path and operation == "delete":
        del at(mapping, path[:-1])[path[-1]]
    elif path:
        at(mapping, path[:-1])[path[-1]] = data.draw(VALUES)


@FUZZ
@given(st.data())
def test_mutations_of_the_quick_study(data):
    mapping = copy.deepcopy(QUICK)
    for _ in range(data.draw(st.integers(1, 4))):
        mutate(data, mapping)
    parses_or_study_error(parse_study, mapping, "quick.yaml")


def test_the_unmutated_quick_study_parses():
    assert isinstance(parse_study(copy.deepcopy(QUICK)), Study)


# -- text ----------------------------------------------------------------------------------


@st.composite
def damaged_yaml(draw) -> str:
    """A dumped structure (often the quick study) with a few characters inserted or deleted."""
    text = yaml.safe_dump(draw(st.one_of(st.just(QUICK), VALUES)), sort_keys=False)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:i] + draw(st.sampled_from(list(":-[]{}&*!|>'\"#%@` \n\t,?")) | st.text(max_size=3)) + text[i:]
        else:
            text = text[:i] + text[i + draw(st.integers(1, 5)) :]
    return text


@FUZZ
@given(st.one_of(st.text(), damaged_yaml()))
def test_random_and_damaged_yaml_text(study_file, text):
    study_file.write_text(text, encoding="utf-8")
    parses_or_study_error(load_study, study_file)


def test_an_escape_beyond_unicode_is_a_study_error(study_file):
    # found by the fuzz test below: PyYAML's scanner raises a bare ValueError from chr() for it
    study_file.write_text('0:\n"\\U01000000', encoding="utf-8")
    with pytest.raises(StudyError, match="invalid YAML: chr"):
        load_study(study_file)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(study_file, blob):
    study_file.write_bytes(blob)
    parses_or_study_error(load_study, study_file)
