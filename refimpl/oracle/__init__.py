"""The correctness oracle: what an engineer needs to check an implementation.

    compare.py       scaled / relative error, check_tensor, per-tensor reports;
                     compare_traces: two traces tensor by tensor, the first
                     divergence, hints (a gradient P times the reference's)
    diagnose.py      the first divergence's hint from the evidence in the tensors
                     (a per-rank softmax max or sum, the targets, weight decay)
    gradcheck.py     centered finite differences of sum(f(x) * dout)
    dense.py         the dense single-process cosine classifier (the
                     reference of the sharded one)
    trace.py         the trace format (a directory of .npz files, one per
                     step, readable with NumPy alone) and its reader, Trace
    recorder.py      TraceRecorder: a refimpl run's steps as a trace
                     (refimpl-train --trace, replay)
    replay.py        run another implementation's trace in refimpl (float64,
                     any P) and compare
    __main__.py      refimpl-oracle replay | compare
    torch_writer.py  TraceWriter: hooks that write a PyTorch model + SGD step as
                     a trace; DistributedTraceWriter: every rank of a
                     torch.distributed job (imports torch: import it yourself,
                     never here)
    torch_resnet.py  an independent PyTorch ResNet + head (imports torch)
    torch_sync_bn.py SyncBatchNorm for any torch.distributed backend (gloo)
    torch_distributed_steps.py  an independent 2-process PyTorch step (DDP, a
                     sharded classifier) with plantable bugs (imports torch)

docs/oracle.md is the user's guide: the workflow and every convention.
Importing ``refimpl.oracle`` never imports PyTorch.
"""
from refimpl.oracle.compare import (check_tensor, compare_tensors, compare_traces,
                                    format_report, format_trace_report, ratio_hint, rel_error,
                                    scaled_error, tensor_diff)
from refimpl.oracle.dense import dense_cosine_softmax
from refimpl.oracle.gradcheck import numerical_grad
from refimpl.models.state_dict import load_encoder_file
from refimpl.oracle.replay import replay, replay_and_compare
from refimpl.oracle.recorder import TraceRecorder
from refimpl.oracle.trace import Trace, TraceError

__all__ = ["Trace", "TraceError", "TraceRecorder", "check_tensor", "compare_tensors",
           "compare_traces", "dense_cosine_softmax", "format_report", "format_trace_report",
           "load_encoder_file", "numerical_grad", "ratio_hint", "rel_error", "replay",
           "replay_and_compare", "scaled_error", "tensor_diff"]
