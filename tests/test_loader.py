"""Where the compiled ops came from: the ahead-of-time build or the JIT build."""
from __future__ import annotations

import os

import torch

import triplet_cuda as tc


def test_loaded_from_reports_a_known_loader():
    where = tc.loaded_from()
    assert isinstance(where, str), where
    prefix, sep, rest = where.partition(":")
    assert sep == ":" and prefix in ("aot", "jit"), where
    assert rest, where


def test_expected_loader():
    # CI sets TRIPLET_CUDA_EXPECT_LOADER to "aot" (installed wheel / `pip install .`) or "jit":
    # this proves which build the tests ran against.
    expected = os.environ.get("TRIPLET_CUDA_EXPECT_LOADER")
    where = tc.loaded_from()
    if not expected:
        return
    assert expected in ("aot", "jit"), f"TRIPLET_CUDA_EXPECT_LOADER must be 'aot' or 'jit', got {expected!r}"
    assert where.split(":", 1)[0] == expected, f"expected the {expected} build, but the ops were loaded from {where!r}"


def test_aot_path_is_the_package_extension():
    where = tc.loaded_from()
    if where.startswith("aot:"):
        path = where[len("aot:"):]
        assert os.path.isfile(path), path
        assert os.path.basename(path).startswith("_C"), path


def test_ops_registered_once():
    # loading again is a no-op returning the same origin
    from triplet_cuda import _loader

    assert _loader.load() == tc.loaded_from()
    assert hasattr(torch.ops.triplet_cuda, "batch_hard_mine")


def test_public_api():
    for name in ["pairwise_distance", "batch_hard_mine", "batch_hard_triplet_loss", "batch_all_triplet_loss",
                 "semi_hard_triplet_loss", "contrastive_loss", "mine_triplets", "TripletLoss", "ContrastiveLoss",
                 "HardMining", "TripletStats", "loaded_from", "reference"]:
        assert hasattr(tc, name), name
    assert tc.HardMining._fields == ("pos_dist", "pos_idx", "neg_dist", "neg_idx")
    assert tc.TripletStats._fields == ("num_valid", "num_positive", "fraction_positive")
