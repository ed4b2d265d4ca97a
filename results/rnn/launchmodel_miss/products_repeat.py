r"""Why the launch model replays only products beyond the last-level cache: every BLAS
product of the validated traces (torch.nn and our default path at the four committed
settings) replayed alone, twice (`launchmodel.measure_products` with no size limit, least
of 7), beside the price the model gives it without a replay (the rate curves of the bench
run that measured that setting, `results/rnn/launchmodel.json`'s validation devices).

    python results/rnn/launchmodel_miss/products_repeat.py \
        > results/rnn/launchmodel_miss/products_repeat.json
"""
import json
import os
import time
from pathlib import Path

import torch

from highwaybp.bench import launchmodel as LM
from highwaybp.bench.opcount import OpTrace

torch.set_num_threads(2)
model = json.loads(Path("results/rnn/launchmodel.json").read_text())
counts = [r for f in model["counts_files"] for r in json.loads(Path(f).read_text())["records"]
          if "signatures" in r["forward"]]
cache = LM.last_level_cache_bytes()
rows = []
for dev_json in model["validation_devices"]:
    curves = LM.Device.from_json(dev_json).without_products()
    measured = json.loads(Path(dev_json["measured_file"]).read_text())["records"]
    ops = {}
    for rec, _ in LM.measured_pairs(counts, measured):
        for phase in (rec["forward"], rec["backward"], rec["forward"].get("fused_inner")):
            for op, calls in (OpTrace.from_json(phase).ops.items() if phase else ()):
                if LM.replay_product(op) is not None:
                    ops.setdefault(op, {})[rec["method"]] = calls
    first = LM.measure_products(ops, min_bytes=0)
    time.sleep(5)
    second = LM.measure_products(ops, min_bytes=0)
    for op, calls in sorted(ops.items(), key=lambda kv: -kv[0].bytes):
        key = LM.product_key(op)
        rows.append({"measured_file": dev_json["measured_file"], "product": key,
                     "bytes": op.bytes, "beyond_cache": op.bytes > cache,
                     "calls_per_step_by_method": calls,
                     "replay_ms": [1e3 * first[key], 1e3 * second[key]],
                     "second_over_first": second[key] / first[key],
                     "curve_ms": 1e3 * LM.op_seconds(op, curves)})
print(json.dumps({"command": "python results/rnn/launchmodel_miss/products_repeat.py",
                  "torch": torch.__version__, "threads": 2,
                  "load_average": os.getloadavg()[0], "last_level_cache_bytes": cache,
                  "products": rows}, indent=1))
