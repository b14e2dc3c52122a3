// Op schemas of the triplet_cuda library, defined once. Kernels live in
// csrc/cpu/*.cpp and csrc/cuda/*.cu, registered by csrc/cpu/register.cpp
// (TORCH_LIBRARY_IMPL(triplet_cuda, CPU, m)) and csrc/cuda/register.cpp
// (TORCH_LIBRARY_IMPL(triplet_cuda, CUDA, m)); fake kernels and autograd are
// registered from Python (triplet_cuda/_ops.py).
//
// Conventions shared by every op:
//   embeddings / x / y : (N, D) / (M, D) floating tensors, any strides
//   labels             : (N,) integer tensor, any values
//   metric             : 0 euclidean, 1 squared_euclidean, 2 cosine
//   distances          : in the dtype of the embeddings
//   loss sums          : 0-d, in the accumulation dtype (float64 for float64
//                        input, float32 otherwise); counts: 0-d int64
#include <Python.h>
#include <torch/library.h>

// An importable (empty) module so an ahead-of-time build is `import triplet_cuda._C`;
// importing it runs the static registrations below. The JIT build loads the same
// sources with torch.ops.load_library instead.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(triplet_cuda, m) {
  // (N, D), (M, D) -> (N, M) distances.
  m.def("pairwise_distance(Tensor x, Tensor y, int metric) -> Tensor");
  // grad (N, M), x, y, dist (N, M) -> (grad_x (N, D), grad_y (M, D)).
  m.def(
      "pairwise_distance_backward(Tensor grad, Tensor x, Tensor y, Tensor dist, int metric)"
      " -> (Tensor, Tensor)");

  // Batch-hard mining: per anchor the farthest positive and the nearest negative
  // (ties: lowest index). -> pos_dist (N), pos_idx (N) int64, neg_dist (N), neg_idx (N) int64;
  // -1 / 0.0 for anchors without a positive or without a negative.
  m.def(
      "batch_hard_mine(Tensor embeddings, Tensor labels, int metric)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // grad_pos_dist (N), grad_neg_dist (N) plus the forward's inputs and outputs -> grad (N, D).
  m.def(
      "batch_hard_mine_backward(Tensor grad_pos_dist, Tensor grad_neg_dist, Tensor embeddings,"
      " Tensor pos_dist, Tensor pos_idx, Tensor neg_dist, Tensor neg_idx, int metric) -> Tensor");

  // Loss ops: -> (loss_sum, num_valid, num_positive), each 0-d; the Python side
  // applies the reduction. Backward: grad_loss_sum (0-d) -> grad (N, D), recomputing
  // the distances block by block.
  m.def(
      "batch_all_loss(Tensor embeddings, Tensor labels, float margin, int metric)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_all_loss_backward(Tensor grad_loss_sum, Tensor embeddings, Tensor labels,"
      " float margin, int metric) -> Tensor");
  m.def(
      "semi_hard_loss(Tensor embeddings, Tensor labels, float margin, int metric)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "semi_hard_loss_backward(Tensor grad_loss_sum, Tensor embeddings, Tensor labels,"
      " float margin, int metric) -> Tensor");
  m.def(
      "contrastive_loss(Tensor embeddings, Tensor labels, float margin, int metric)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_loss_backward(Tensor grad_loss_sum, Tensor embeddings, Tensor labels,"
      " float margin, int metric) -> Tensor");
  // The forward when a gradient will be wanted: also grad_sum (N, D), accumulation dtype, the
  // gradient of loss_sum, computed in the same pass (the backward is then g * grad_sum).
  m.def(
      "contrastive_loss_with_grad(Tensor embeddings, Tensor labels, float margin, int metric)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // The hinge form (pytorch-metric-learning's ContrastiveLoss) over pairs i < j:
  // relu(d - pos_margin) for the same label, relu(neg_margin - d) otherwise, the two parts
  // apart -> (pos_sum, pos_nonzero, neg_sum, neg_nonzero) (sums 0-d accumulation dtype,
  // counts of terms > 0 0-d int64). Backward: grad_pos_sum, grad_neg_sum (0-d) -> grad (N, D).
  m.def(
      "contrastive_hinge_loss(Tensor embeddings, Tensor labels, float pos_margin,"
      " float neg_margin, int metric) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_hinge_loss_backward(Tensor grad_pos_sum, Tensor grad_neg_sum,"
      " Tensor embeddings, Tensor labels, float pos_margin, float neg_margin, int metric)"
      " -> Tensor");

  // Index triplets (anchor, positive, negative), each (T,) int64, for a strategy:
  // 0 batch_hard, 1 batch_all, 2 semi_hard. T depends on the data.
  m.def(
      "mine_triplets(Tensor embeddings, Tensor labels, int strategy, int metric)"
      " -> (Tensor, Tensor, Tensor)");

  // k nearest neighbours: for each query row the k nearest rows of ref, ascending distance,
  // ties by the lowest ref index, NaN distances last. self_offset >= 0 says that query row i
  // is ref row self_offset + i, which is then never returned for it (the reference set is the
  // query set, or a slice of it holds the queries); -1 excludes nothing. Rows with fewer than
  // k candidates are padded with +inf / -1. -> dist (N, k) in the dtype of query, idx (N, k)
  // int64. Not differentiable.
  m.def("knn(Tensor query, Tensor ref, int k, int metric, int self_offset) -> (Tensor, Tensor)");

  // Query vs reference (the *_ref ops): anchors are the rows of embeddings (N, D) with labels
  // (N,); positives and negatives (contrastive: pair partners) are the rows of ref (M, D), of
  // the dtype, feature size and device of embeddings, with ref_labels (M,) integer.
  // self_index (N,) int64: the reference row that is anchor i itself (never its positive nor
  // its pair), -1 where none. Indices returned point into ref. Semantics as the ops above, over
  // anchor x reference rows; contrastive sums ordered pairs (a, j), j != self_index[a]. The
  // backward ops return (grad_embeddings (N, D), grad_ref (M, D)); with ref_grad false
  // grad_ref is an empty (0,) tensor and costs no work.
  m.def(
      "batch_hard_mine_ref(Tensor embeddings, Tensor labels, Tensor ref, Tensor ref_labels,"
      " Tensor self_index, int metric) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_hard_mine_ref_backward(Tensor grad_pos_dist, Tensor grad_neg_dist, Tensor embeddings,"
      " Tensor ref, Tensor pos_dist, Tensor pos_idx, Tensor neg_dist, Tensor neg_idx, int metric,"
      " bool ref_grad) -> (Tensor, Tensor)");
  m.def(
      "batch_all_loss_ref(Tensor embeddings, Tensor labels, Tensor ref, Tensor ref_labels,"
      " Tensor self_index, float margin, int metric) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_all_loss_ref_backward(Tensor grad_loss_sum, Tensor embeddings, Tensor labels, Tensor ref,"
      " Tensor ref_labels, Tensor self_index, float margin, int metric, bool ref_grad)"
      " -> (Tensor, Tensor)");
  m.def(
      "semi_hard_loss_ref(Tensor embeddings, Tensor labels, Tensor ref, Tensor ref_labels,"
      " Tensor self_index, float margin, int metric) -> (Tensor, Tensor, Tensor)");
  m.def(
      "semi_hard_loss_ref_backward(Tensor grad_loss_sum, Tensor embeddings, Tensor labels, Tensor ref,"
      " Tensor ref_labels, Tensor self_index, float margin, int metric, bool ref_grad)"
      " -> (Tensor, Tensor)");
  m.def(
      "contrastive_loss_ref(Tensor embeddings, Tensor labels, Tensor ref, Tensor ref_labels,"
      " Tensor self_index, float margin, int metric) -> (Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_loss_ref_backward(Tensor grad_loss_sum, Tensor embeddings, Tensor labels, Tensor ref,"
      " Tensor ref_labels, Tensor self_index, float margin, int metric, bool ref_grad)"
      " -> (Tensor, Tensor)");
  m.def(
      "mine_triplets_ref(Tensor embeddings, Tensor labels, Tensor ref, Tensor ref_labels,"
      " Tensor self_index, int strategy, int metric) -> (Tensor, Tensor, Tensor)");
}
