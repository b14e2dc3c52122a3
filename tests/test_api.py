"""The Python surface: docstrings (Google style, examples that run), type hints, py.typed,
return_stats and the repr of the modules."""
from __future__ import annotations

import doctest
import inspect
import pydoc
import typing
from pathlib import Path

import pytest
import torch

import triplet_cuda as tc
from triplet_cuda import _loader, _types, functional, modules
from triplet_cuda import reference as R
from conftest import METRICS, assert_close, make_batch

PUBLIC_FUNCTIONS = [tc.pairwise_distance, tc.batch_hard_mine, tc.batch_hard_triplet_loss, tc.batch_all_triplet_loss,
                    tc.semi_hard_triplet_loss, tc.contrastive_loss, tc.mine_triplets]
PUBLIC_CLASSES = [tc.TripletLoss, tc.ContrastiveLoss]


@pytest.mark.parametrize("module", [tc, functional, modules, _types, _loader], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(module, module.__name__) if t.examples]
    assert tests or module is _loader, f"{module.__name__} has no docstring examples"
    with torch.random.fork_rng():
        for t in tests:
            runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {module.__name__} failed"


@pytest.mark.parametrize("obj", PUBLIC_FUNCTIONS + PUBLIC_CLASSES, ids=lambda o: o.__name__)
def test_google_style_sections(obj):
    doc = inspect.getdoc(obj)
    assert doc, obj
    sections = ["Args:", "Shapes:", "Raises:", "Example:"] + ([] if inspect.isclass(obj) else ["Returns:"])
    for section in sections:
        assert f"\n{section}\n" in doc, f"{obj.__name__}: no {section} section"
    # every argument is documented
    params = [p for p in inspect.signature(obj).parameters if p != "self"]
    args = doc.split("\nArgs:\n", 1)[1].split("\n\n", 1)[0]
    for p in params:
        assert f"    {p}: " in f"\n{args}" or args.startswith(f"{p}: ") or f"\n    {p}: " in args, \
            f"{obj.__name__}: argument {p} not in Args"
    assert ":param" not in doc and "Parameters\n----------" not in doc  # one style: Google


def test_help_shows_the_module_and_class_docs():
    assert "fused triplet and contrastive losses" in pydoc.render_doc(tc)
    text = pydoc.render_doc(tc.TripletLoss)
    assert "Triplet loss with in-batch mining" in text and "return_stats" in text
    assert "Contrastive loss over all in-batch pairs" in pydoc.render_doc(tc.ContrastiveLoss)
    assert "Args:" in pydoc.render_doc(tc.mine_triplets)
    for mod in (functional, modules, _types):
        assert mod.__doc__ and mod.__doc__.strip(), mod


@pytest.mark.parametrize("obj", PUBLIC_FUNCTIONS + [tc.TripletLoss.__init__, tc.TripletLoss.forward,
                                                    tc.ContrastiveLoss.__init__, tc.ContrastiveLoss.forward,
                                                    tc.loaded_from], ids=lambda o: o.__qualname__)
def test_type_hints_resolve(obj):
    hints = typing.get_type_hints(obj)
    params = [p for p in inspect.signature(obj).parameters if p != "self"]
    for p in params:
        assert p in hints, f"{obj.__qualname__}: {p} has no type hint"
    assert "return" in hints, obj


def test_literal_hints_list_the_accepted_values():
    hints = typing.get_type_hints(tc.batch_hard_triplet_loss)
    assert set(typing.get_args(hints["metric"])) == set(METRICS)
    assert set(typing.get_args(hints["reduction"])) == {"mean", "mean_nonzero", "sum", "none"}
    assert set(typing.get_args(typing.get_type_hints(tc.mine_triplets)["strategy"])) == {
        "batch_hard", "batch_all", "semi_hard"}


def test_py_typed_ships_with_the_package():
    assert (Path(tc.__file__).parent / "py.typed").is_file()
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'triplet_cuda = ["py.typed"]' in pyproject


# ----------------------------------------------------------------------------- modules
@pytest.mark.parametrize("mining,fn,ref_fn", [
    ("batch_hard", tc.batch_hard_triplet_loss, R.batch_hard_triplet_loss),
    ("batch_all", tc.batch_all_triplet_loss, R.batch_all_triplet_loss),
    ("semi_hard", tc.semi_hard_triplet_loss, R.semi_hard_triplet_loss),
])
def test_triplet_loss_module_return_stats(mining, fn, ref_fn):
    x, labels = make_batch(29, 5, 4, seed=11)
    module = tc.TripletLoss(0.5, mining=mining, metric="cosine", return_stats=True)
    loss, stats = module(x, labels)
    assert isinstance(stats, tc.TripletStats)
    expected_loss, expected_stats = fn(x, labels, 0.5, metric="cosine", return_stats=True)
    assert torch.equal(loss, expected_loss)
    for a, b in zip(stats, expected_stats):
        assert torch.equal(a, b)
    # against the reference: counts and the loss
    ref_loss, ref_stats = ref_fn(x, labels, 0.5, metric="cosine", reduction=module.reduction, return_stats=True)
    assert_close(loss, ref_loss, torch.float64)
    assert int(stats.num_valid) == int(ref_stats.num_valid) and int(stats.num_positive) == int(ref_stats.num_positive)
    # without return_stats: the loss alone
    plain = tc.TripletLoss(0.5, mining=mining, metric="cosine")(x, labels)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, loss)


def test_contrastive_loss_module_return_stats():
    x, labels = make_batch(17, 4, 3, seed=12, scale=0.3)
    loss, stats = tc.ContrastiveLoss(0.9, return_stats=True)(x, labels)
    ref_loss, ref_stats = R.contrastive_loss(x, labels, 0.9, return_stats=True)
    assert_close(loss, ref_loss, torch.float64)
    assert int(stats.num_valid) == 17 * 16 // 2 == int(ref_stats.num_valid)
    assert int(stats.num_positive) == int(ref_stats.num_positive)


def test_module_repr_shows_the_configuration():
    module = tc.TripletLoss(0.3, mining="batch_all", metric="cosine", return_stats=True)
    assert repr(module) == ("TripletLoss(margin=0.3, mining='batch_all', metric='cosine', soft_margin=False, "
                            "reduction='mean_nonzero', return_stats=True)")
    assert repr(tc.ContrastiveLoss()) == ("ContrastiveLoss(margin=1.0, metric='euclidean', reduction='mean', "
                                          "return_stats=False)")
    # nested: the configuration shows inside a model's repr
    assert "TripletLoss(margin=0.3" in repr(torch.nn.ModuleDict({"loss": module}))
