"""Why the launch model under-prices torch.nn.GRU's CPU backward at the GRU pixel setting
(T = 1024, B = 128, H = 64, input 3; 2 threads): the profiler's heaviest ops of one backward,
and the product that dominates it ([192, 131072] x [131072, 3], the input weights' gradient)
timed with each operand layout. The model's trace records shapes, not strides.

    python results/rnn/launchmodel_miss/probe.py > results/rnn/launchmodel_miss/probe.json
"""
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from highwaybp.bench.timing import median_seconds

torch.set_num_threads(2)
T, B, H, IN = 1024, 128, 64, 3


def best_ms(fn):
    return 1e3 * median_seconds(fn, repeats=5)["min_s"]


torch.manual_seed(0)
rnn = torch.nn.GRU(IN, H)
x, gy = torch.randn(T, B, IN), torch.randn(T, B, H)
for _ in range(3):
    rnn(x)[0].backward(gy)
backward_ms = []
for _ in range(5):
    y, _ = rnn(x)
    t0 = time.perf_counter()
    y.backward(gy)
    backward_ms.append(1e3 * (time.perf_counter() - t0))
y, _ = rnn(x)
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    y.backward(gy)
ops = sorted(({"op": e.key, "input_shapes": str(e.input_shapes), "calls": e.count,
               "self_ms": e.self_cpu_time_total / 1e3}
              for e in prof.key_averages(group_by_input_shape=True)
              if e.key.startswith(("aten::", "mkldnn::"))),
             key=lambda r: -r["self_ms"])[:8]
a, b = torch.randn(192, T * B), torch.randn(T * B, 3)
a_t, b_t = torch.randn(T * B, 192).t(), torch.randn(3, T * B).t()
layouts = {"both contiguous": best_ms(lambda: torch.mm(a, b)),
           "first a transposed view": best_ms(lambda: torch.mm(a_t, b)),
           "second a transposed view": best_ms(lambda: torch.mm(a, b_t)),
           "both transposed views": best_ms(lambda: torch.mm(a_t, b_t))}
print(json.dumps({"command": "python results/rnn/launchmodel_miss/probe.py",
                  "torch": torch.__version__, "threads": 2,
                  "load_average": os.getloadavg()[0],
                  "torch_gru_backward_ms": sorted(backward_ms),
                  "heaviest_ops_one_backward": ops,
                  "mm_192x131072_by_131072x3_ms_by_layout": layouts}, indent=1))
