"""Named float tolerances for the test suite, each with where it comes from.

Every bound is one of two kinds, never the noise of the machine a test was
written on:

- derived from the float rounding of the computation it checks: its length
  and its condition (Higham, *Accuracy and Stability of Numerical
  Algorithms*, 2nd ed., ch. 2-4);
- measured, where a derivation would be vacuous (a whole network over SGD
  steps, another library's kernels): the largest error over every OpenBLAS
  kernel this CPU runs (``tests/kernel_matrix.py``: Prescott, Nehalem,
  Sandybridge, Haswell, SkylakeX, Cooperlake; Zen runs Haswell's code) and
  ``REFIMPL_NUM_THREADS`` 1, 2, 4, times a margin of 100.

u = eps / 2 is the unit roundoff: one rounding moves a result by at most u
relative. An error is ``check_tensor``'s scaled error, max |a - b| / max |b|,
unless the test says otherwise: relative to the largest entry, so an entry
near zero needs no condition number of its own.

Bitwise equality (``array_equal``, ``==``) needs no bound and is asserted only
where it is guaranteed: the same process, or the same machine, kernel and
thread count, or operations whose order does not depend on the split.
"""
import numpy as np

EPS64 = float(np.finfo(np.float64).eps)  # 2.2e-16: the spacing of float64 at 1
EPS32 = float(np.finfo(np.float32).eps)  # 1.2e-7
U64 = EPS64 / 2                          # unit roundoff, round to nearest
U32 = EPS32 / 2


def gamma(n, u=U64):
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n
    successive roundings (a product of n factors; a recursive sum of n + 1
    terms, relative to the sum of their absolute values)."""
    return n * u / (1 - n * u)


def sum_bound(n, cond=1.0, u=U64):
    """Two evaluations of one n-term sum or dot product in different orders
    (another blocking, BLAS kernel, FMA or not, thread split, shard) differ by
    at most 2 gamma_n sum |x_i|: relative to the result, 2 gamma_n cond with
    cond = sum |x_i| / |sum x_i| (1 for positive terms; ~sqrt(n) for random
    signs, relative to the largest of many such sums). A worst case: the
    typical error is ~sqrt(n) u cond."""
    return 2 * gamma(n, u) * cond


# ------------------------------------------------------------ float64

ROUNDINGS64 = 1e-15
"""A result within a few roundings of its reference, 9 u = 1.0e-15: an
elementwise formula of <= 4 roundings written two ways (2 gamma_4 = 8 u), or
recomputed from its own output (the norm of 5 normalized entries: (5 + 3) u).
Also the bound of comparisons that are exact (no rounding at all: a max, a
division by 0.5, the same rows picked two ways, the same sums in one order)."""

SHORT64 = 1e-14
"""A short computation evaluated two ways, up to 45 roundings (times the
condition) on each side: sum_bound(n, cond) <= 1e-14 for n cond <= 45 (a
BatchNorm statistic of a small batch, <= 9 overlapping pooling windows, a
softmax row, a norm and a divide)."""

LAYER64 = 1e-12
"""One layer (or a few) in float64 evaluated two ways: the fast path against
its loop twin, another blocking or BLAS kernel, threads, shards, the size-1
communicator against plain code, an SGD step in torch's order. Each output is
a sum of n terms in another order, relative to the largest output:
sum_bound(n, sqrt(n)) = 2 n^1.5 u <= 1e-12 for n <= 270 (a 3x3 convolution
over 30 channels). Where it serves a whole tiny network (sync against plain
BatchNorm, features batched otherwise) it is measured: at most 4.4e-15 over
the kernel matrix (200x)."""

INDEPENDENT64 = 1e-10
"""Two independent float64 implementations, one evaluation: a layer or a
whole network's forward and backward by PyTorch (whose kernels' order is not
ours to see), on the GPU, on P ranks against 1, a teacher-forced replay of a
trace, a run resumed on another P. Through tens of layers and BatchNorm's
divisions by the batch std a derived bound is vacuous; measured: at most
7e-13 over the kernel matrix (a convolution's elementwise relative error
against PyTorch), times 100 -> 7e-11."""

STEPS64 = 1e-9
"""Two float64 implementations of a few SGD steps of a whole network (3 steps
against PyTorch, P ranks against 1, a replayed 2-step trace): each step's
rounding differences are carried into the next one's weights and grow
(BatchNorm over small batches, a tiny network), so no derivation bounds them;
measured: at most 9.5e-12 over the kernel matrix (the momentum of the head's
last bias after 3 steps against PyTorch), times 100 -> 9.5e-10."""

TRAIN64 = 1e-8
"""Two runs of refimpl-train on different P (2 epochs: the prior, the
neighbour table, 12 steps): STEPS64's growth over 4 times the steps;
measured: at most 2.3e-11 (every saved tensor) and 6.5e-12 (the loss curve)
over the kernel matrix, times 100 -> 2.3e-9, rounded up to 1e-8."""

# ------------------------------------------------------------ finite differences

FD_STEP = 1e-6  # refimpl.oracle.gradcheck.numerical_grad's default h


def fd_bound(h=FD_STEP, f_over_g=45.0, u=U64):
    """Scaled error of centered differences (``numerical_grad``) in float64.

    Truncation: h^2 |f'''| / 6, O(h^2) = 1e-12 relative at h = 1e-6 (0 for
    piecewise-linear max pool and ReLU). Rounding: each evaluation of
    f = sum(out * dout) carries <= c u F, F = sum |out * dout|, with c ~ 20
    (the layer's few roundings per term and numpy's pairwise sum's, <= 16 +
    log2(n / 128)); the difference of two over 2h gives c u F / h.
    Relative to max |g|: c u (F / max|g|) / h + h^2. F / max|g| is at most 45
    for the suite's checks (58 for test_blocks, which has its own); measured,
    c reaches 1.3 (2.8e-9 at h = 1e-6, test_loss) over the kernel matrix.
    """
    return 20 * u * f_over_g / h + h * h


FD64 = 1e-7  # fd_bound() at h = 1e-6 and F / max|g| = 45: 9.99e-8

# ------------------------------------------------------------ float32


def float32_bound(n):
    """A float32 result of n-term sums against float64 on the same (float32)
    inputs: only the float32 side rounds, gamma_n(u32) cond with cond ~ sqrt(n)
    (random signs, relative to the largest output)."""
    return gamma(n, U32) * np.sqrt(n)


LAYER32 = 1e-5
"""One float32 layer against float64 on the same inputs: float32_bound(n)
<= 1e-5 for n <= 30 (BatchNorm over <= 27 values per channel). Measured: at
most 1.9e-7."""

INDEPENDENT32 = 1e-4
"""The float32 counterpart of INDEPENDENT64 for one evaluation (a layer on the
GPU, refimpl's float32 network against its float64 one) and the float32 rtol
of the trace format (``compare.TOLERANCES``). Rounding is first order in u,
so a float32 comparison errs u32 / u64 = 5.4e8 times its float64
counterpart: <= 5.4e8 x 1.4e-13 = 7.6e-5 for the networks compared here.
Measured: at most 2.8e-6 (a float32 ResNet-18 against float64) and 4.4e-7 (a
layer on the GPU, an H200)."""

NETWORK32 = 1e-3
"""A float32 PyTorch trace (2 steps, P = 1 and 2) replayed by refimpl in
float64: u32 / u64 times the float64 error of the same comparison, 5.4e8 x
6.6e-13 = 3.6e-4. Measured: at most 4.4e-5 (PyTorch's own float32 kernels:
the same on every OpenBLAS kernel)."""
