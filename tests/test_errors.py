"""Argument errors of the public API: each names the argument, what was expected and what came."""
from __future__ import annotations

import pytest
import torch

import triplet_cuda as tc

X = torch.randn(4, 3)
L = torch.tensor([0, 0, 1, 1])

LOSS_FNS = {
    "batch_hard_triplet_loss": tc.batch_hard_triplet_loss,
    "batch_all_triplet_loss": tc.batch_all_triplet_loss,
    "semi_hard_triplet_loss": tc.semi_hard_triplet_loss,
    "contrastive_loss": tc.contrastive_loss,
}
# every function taking (embeddings, labels)
BATCH_FNS = {
    **LOSS_FNS,
    "batch_hard_mine": tc.batch_hard_mine,
    "mine_triplets": tc.mine_triplets,
    "TripletLoss": tc.TripletLoss(),
    "TripletLoss(batch_all)": tc.TripletLoss(mining="batch_all"),
    "TripletLoss(semi_hard)": tc.TripletLoss(mining="semi_hard"),
    "ContrastiveLoss": tc.ContrastiveLoss(),
}
BATCH_IDS = list(BATCH_FNS)

# (embeddings, labels, exception, pattern naming the argument, the expectation and what came)
BAD_BATCHES = [
    ("1-D embeddings", torch.randn(4), L, ValueError, r"embeddings must be a 2-D \(N, D\) tensor, got 1-D with shape \(4,\)"),
    ("3-D embeddings", torch.randn(2, 4, 3), L, ValueError, r"embeddings must be a 2-D \(N, D\) tensor, got 3-D with shape \(2, 4, 3\)"),
    ("int embeddings", torch.ones(4, 3, dtype=torch.int64), L, TypeError,
     r"embeddings must be float32, float64, float16 or bfloat16, got torch\.int64"),
    ("uint8 embeddings", torch.ones(4, 3, dtype=torch.uint8), L, TypeError, r"embeddings must be float32.*got torch\.uint8"),
    ("complex embeddings", torch.ones(4, 3, dtype=torch.complex64), L, TypeError, r"embeddings must be float32.*got torch\.complex64"),
    ("list embeddings", [[0.0, 1.0]] * 4, L, TypeError, r"embeddings must be a torch\.Tensor, got list"),
    ("float labels", X, L.float(), TypeError, r"labels must have an integer dtype, got torch\.float32"),
    ("float64 labels", X, L.double(), TypeError, r"labels must have an integer dtype, got torch\.float64"),
    ("bool labels", X, L.bool(), TypeError, r"labels must have an integer dtype, got torch\.bool"),
    ("2-D labels", X, L[None], ValueError, r"labels must be a 1-D \(N,\) tensor, got 2-D with shape \(1, 4\)"),
    ("2-D labels (N, 1)", X, L[:, None], ValueError, r"labels must be a 1-D \(N,\) tensor, got 2-D with shape \(4, 1\)"),
    ("0-D labels", X, torch.tensor(1), ValueError, r"labels must be a 1-D \(N,\) tensor, got 0-D"),
    ("short labels", X, L[:3], ValueError, r"labels must have one entry per embedding: expected length 4 .*got 3"),
    ("long labels", X, torch.zeros(5, dtype=torch.long), ValueError, r"labels must have one entry per embedding: expected length 4 .*got 5"),
    ("list labels", X, [0, 0, 1, 1], TypeError, r"labels must be a torch\.Tensor, got list"),
    ("labels on another device", X, L.to("meta"), ValueError, r"labels must be on the device of embeddings \(cpu\), got meta"),
]


@pytest.mark.parametrize("fn_name", BATCH_IDS)
@pytest.mark.parametrize("case", BAD_BATCHES, ids=[c[0] for c in BAD_BATCHES])
def test_bad_batch(fn_name, case):
    _, embeddings, labels, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        BATCH_FNS[fn_name](embeddings, labels)


@pytest.mark.parametrize("fn_name", BATCH_IDS)
def test_unknown_metric(fn_name):
    fn = BATCH_FNS[fn_name]
    if isinstance(fn, torch.nn.Module):
        cls = type(fn)
        with pytest.raises(ValueError, match=r"metric must be one of 'euclidean', 'squared_euclidean', 'cosine', got 'l1'"):
            cls(metric="l1")
        return
    with pytest.raises(ValueError, match=r"metric must be one of 'euclidean', 'squared_euclidean', 'cosine', got 'l1'"):
        fn(X, L, metric="l1")
    with pytest.raises(ValueError, match=r"metric must be one of .*got 'Euclidean'"):
        fn(X, L, metric="Euclidean")
    with pytest.raises(ValueError, match=r"metric must be one of .*got 0"):
        fn(X, L, metric=0)


@pytest.mark.parametrize(
    "fn_name,allowed",
    [
        ("batch_hard_triplet_loss", "'mean', 'mean_nonzero', 'sum', 'none'"),
        ("batch_all_triplet_loss", "'mean', 'mean_nonzero', 'sum'"),
        ("semi_hard_triplet_loss", "'mean', 'mean_nonzero', 'sum'"),
        ("contrastive_loss", "'mean', 'mean_nonzero', 'sum'"),
    ],
)
def test_unknown_reduction(fn_name, allowed):
    fn = LOSS_FNS[fn_name]
    with pytest.raises(ValueError, match=rf"reduction must be one of {allowed}, got 'avg'"):
        fn(X, L, reduction="avg")
    with pytest.raises(ValueError, match=r"reduction must be one of .*got None"):
        fn(X, L, reduction=None)
    if fn_name != "batch_hard_triplet_loss":
        # "none" is for batch hard only
        with pytest.raises(ValueError, match=rf"reduction must be one of {allowed}, got 'none'"):
            fn(X, L, reduction="none")


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semi_hard"])
def test_module_unknown_reduction(mining):
    # the module reports a bad reduction, at the latest when called
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'avg'"):
        tc.TripletLoss(mining=mining, reduction="avg")(X, L)
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'avg'"):
        tc.ContrastiveLoss(reduction="avg")(X, L)


def test_unknown_strategy_and_mining():
    with pytest.raises(ValueError, match=r"strategy must be one of 'batch_hard', 'batch_all', 'semi_hard', got 'hardest'"):
        tc.mine_triplets(X, L, strategy="hardest")
    with pytest.raises(ValueError, match=r"mining must be one of 'batch_hard', 'batch_all', 'semi_hard', got 'random'"):
        tc.TripletLoss(mining="random")
    with pytest.raises(ValueError, match=r"soft_margin is only defined for mining='batch_hard', got mining='semi_hard'"):
        tc.TripletLoss(mining="semi_hard", soft_margin=True)


MARGIN_EXPECTED = r"margin must be a finite number >= 0 \(Python, numpy or 0-d tensor real scalar\)"


@pytest.mark.parametrize("fn_name", list(LOSS_FNS))
@pytest.mark.parametrize(
    "margin,got",
    [(float("nan"), r", got nan"), (float("inf"), r", got inf"), ("0.2", r", got '0\.2' \(str\)"), (None, r", got None"),
     (True, r", got True \(bool\)"), (torch.tensor([0.2, 0.3]), r", got a 1-D torch\.float32 tensor with shape \(2,\)"),
     (torch.tensor(True), r", got a 0-D torch\.bool tensor"), (-0.1, r": negative margins are not supported, got -0\.1"),
     (torch.tensor(-1.0), r": negative margins are not supported, got -1\.0"),
     (torch.tensor(0.2, requires_grad=True), r" that does not require grad .*requires_grad=True")],
    ids=["nan", "inf", "str", "None", "bool", "1-D tensor", "bool tensor", "negative", "negative tensor", "requires_grad"],
)
def test_bad_margin(fn_name, margin, got):
    with pytest.raises(ValueError, match=MARGIN_EXPECTED + got):
        LOSS_FNS[fn_name](X, L, margin)


def test_bad_margin_module():
    with pytest.raises(ValueError, match=MARGIN_EXPECTED + r", got nan"):
        tc.TripletLoss(margin=float("nan"))
    with pytest.raises(ValueError, match=MARGIN_EXPECTED + r", got inf"):
        tc.ContrastiveLoss(margin=float("inf"))
    with pytest.raises(ValueError, match=MARGIN_EXPECTED + r": negative margins are not supported, got -1\.0"):
        tc.ContrastiveLoss(margin=-1.0)


PAIRWISE_ERRORS = [
    ("1-D x", lambda: tc.pairwise_distance(torch.randn(3)), ValueError, r"x must be a 2-D \(N, D\) tensor, got 1-D with shape \(3,\)"),
    ("3-D y", lambda: tc.pairwise_distance(X, torch.randn(2, 2, 3)), ValueError, r"y must be a 2-D \(N, D\) tensor, got 3-D"),
    ("int x", lambda: tc.pairwise_distance(X.long()), TypeError, r"x must be float32, float64, float16 or bfloat16, got torch\.int64"),
    ("int y", lambda: tc.pairwise_distance(X, X.int()), TypeError, r"y must be float32, float64, float16 or bfloat16, got torch\.int32"),
    ("feature size", lambda: tc.pairwise_distance(X, torch.randn(5, 2)), ValueError, r"y must have the feature size of x \(3\), got 2"),
    ("dtype", lambda: tc.pairwise_distance(X, X.double()), TypeError, r"y must have the dtype of x \(torch\.float32\), got torch\.float64"),
    ("device", lambda: tc.pairwise_distance(X, X.to("meta")), ValueError, r"y must be on the device of x \(cpu\), got meta"),
    ("metric", lambda: tc.pairwise_distance(X, metric="manhattan"), ValueError,
     r"metric must be one of 'euclidean', 'squared_euclidean', 'cosine', got 'manhattan'"),
    ("metric positional", lambda: tc.pairwise_distance(X, "cosine"), TypeError, r"y must be a torch\.Tensor, got str"),
    ("x not a tensor", lambda: tc.pairwise_distance([[1.0]]), TypeError, r"x must be a torch\.Tensor, got list"),
]


@pytest.mark.parametrize("case", PAIRWISE_ERRORS, ids=[c[0] for c in PAIRWISE_ERRORS])
def test_pairwise_distance_errors(case):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


def test_keyword_only_arguments():
    # metric, reduction, soft_margin, return_stats and strategy are keyword-only
    with pytest.raises(TypeError):
        tc.batch_hard_triplet_loss(X, L, 0.2, "cosine")
    with pytest.raises(TypeError):
        tc.mine_triplets(X, L, "batch_all")
    with pytest.raises(TypeError):
        tc.batch_hard_mine(X, L, "cosine")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("fn_name", BATCH_IDS)
def test_mismatched_devices_cuda(fn_name):
    with pytest.raises(ValueError, match=r"labels must be on the device of embeddings \(cuda:0\), got cpu"):
        BATCH_FNS[fn_name](X.cuda(), L)
    with pytest.raises(ValueError, match=r"labels must be on the device of embeddings \(cpu\), got cuda:0"):
        BATCH_FNS[fn_name](X, L.cuda())
    with pytest.raises(ValueError, match=r"y must be on the device of x \(cuda:0\), got cpu"):
        tc.pairwise_distance(X.cuda(), X)


# ----------------------------------------------------------------------------- direct op calls (C++ checks)
ops = torch.ops.triplet_cuda
X4, L4 = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
OP_ERRORS = [
    ("pairwise 1-D x", lambda: ops.pairwise_distance(torch.randn(3), X4, 0), r"x must be a 2-D \(N, D\) tensor, got 1-D"),
    ("pairwise int y", lambda: ops.pairwise_distance(X4, X4.long(), 0), r"y must be float32, float64, float16 or bfloat16, got Long"),
    ("pairwise dtype", lambda: ops.pairwise_distance(X4, X4.double(), 0), r"y must have the dtype of x \(Float\), got Double"),
    ("pairwise feature size", lambda: ops.pairwise_distance(X4, torch.randn(2, 5), 0), r"y must have the feature size of x \(3\), got 5"),
    ("pairwise metric", lambda: ops.pairwise_distance(X4, X4, 3), r"metric must be 0 \(euclidean\), 1 \(squared_euclidean\) or 2 \(cosine\), got 3"),
    ("pairwise metric negative", lambda: ops.pairwise_distance(X4, X4, -1), r"metric must be 0 .*got -1"),
    ("mine 3-D embeddings", lambda: ops.batch_hard_mine(torch.randn(2, 4, 3), L4, 0), r"embeddings must be a 2-D \(N, D\) tensor, got 3-D"),
    ("mine int embeddings", lambda: ops.batch_hard_mine(X4.int(), L4, 0), r"embeddings must be float32.*got Int"),
    ("mine float labels", lambda: ops.batch_hard_mine(X4, L4.float(), 0), r"labels must have an integer dtype, got Float"),
    ("mine bool labels", lambda: ops.batch_hard_mine(X4, L4.bool(), 0), r"labels must have an integer dtype, got Bool"),
    ("mine 2-D labels", lambda: ops.batch_hard_mine(X4, L4[None], 0), r"labels must be a 1-D \(N,\) tensor, got 2-D"),
    ("mine short labels", lambda: ops.batch_hard_mine(X4, L4[:3], 0), r"labels must have length 4 \(embeddings\.size\(0\)\), got 3"),
    ("mine labels device", lambda: ops.batch_hard_mine(X4, L4.to("meta"), 0), r"labels must be on the device of embeddings \(cpu\), got meta"),
    ("loss labels device", lambda: ops.batch_all_loss(X4, L4.to("meta"), 0.2, 0), r"labels must be on the device of embeddings \(cpu\), got meta"),
    ("mine_triplets labels device", lambda: ops.mine_triplets(X4, L4.to("meta"), 0, 0), r"labels must be on the device of embeddings \(cpu\), got meta"),
    ("pairwise y device", lambda: ops.pairwise_distance(X4, X4.to("meta"), 0), r"y must be on the device of x \(cpu\), got meta"),
    ("mine metric", lambda: ops.batch_hard_mine(X4, L4, 7), r"metric must be 0 .*got 7"),
    ("loss metric", lambda: ops.batch_all_loss(X4, L4, 0.2, 9), r"metric must be 0 .*got 9"),
    ("loss labels", lambda: ops.semi_hard_loss(X4, L4[:2], 0.2, 0), r"labels must have length 4 .*got 2"),
    ("loss embeddings", lambda: ops.contrastive_loss(torch.randn(4), L4, 1.0, 0), r"embeddings must be a 2-D \(N, D\) tensor, got 1-D"),
    ("mine_triplets strategy", lambda: ops.mine_triplets(X4, L4, 3, 0),
     r"strategy must be 0 \(batch_hard\), 1 \(batch_all\) or 2 \(semi_hard\), got 3"),
    ("mine_triplets metric", lambda: ops.mine_triplets(X4, L4, 0, 5), r"metric must be 0 .*got 5"),
    ("hard backward idx dtype", lambda: ops.batch_hard_mine_backward(
        torch.zeros(4), torch.zeros(4), X4, torch.zeros(4), torch.zeros(4, dtype=torch.int32), torch.zeros(4),
        torch.zeros(4, dtype=torch.long), 0), r"pos_idx and neg_idx must be int64, got Int and Long"),
]


@pytest.mark.parametrize("case", OP_ERRORS, ids=[c[0] for c in OP_ERRORS])
def test_direct_op_errors(case):
    _, call, pattern = case
    with pytest.raises(RuntimeError, match=r"triplet_cuda: " + pattern):
        call()
