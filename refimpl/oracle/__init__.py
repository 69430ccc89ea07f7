"""The correctness oracle: what an engineer needs to check an implementation.

    compare.py       scaled / relative error, check_tensor, per-tensor reports
    gradcheck.py     centered finite differences of sum(f(x) * dout)
    dense.py         the dense single-process cosine classifier (the
                     reference of the sharded one)
    torch_resnet.py  an independent PyTorch ResNet + head (import only with
                     torch installed; not imported here)
"""
from refimpl.oracle.compare import (check_tensor, compare_tensors, format_report, rel_error,
                                    scaled_error, tensor_diff)
from refimpl.oracle.dense import dense_cosine_softmax
from refimpl.oracle.gradcheck import numerical_grad

__all__ = ["check_tensor", "compare_tensors", "dense_cosine_softmax", "format_report",
           "numerical_grad", "rel_error", "scaled_error", "tensor_diff"]
