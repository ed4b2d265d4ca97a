"""DDG: decoupled parallel backpropagation with delayed gradients (Huo et al., ICML 2018),
the baseline for decoupled training.

- `stage.py`: `split_model` and `DDGStage` (one module, its optimizer, delay and in-flight
  batches; the two stale-gradient semantics), shared by the oracle and the runtime.
- `oracle.py`: `DDGTrainer`, every stage in one process on the runtime's exact schedule.
- `runtime.py`: one rank per module on torch.distributed (`run_rank`, `run_from_env` under
  torchrun), over the transport of `highwaybp.distributed.transport`.
- `launch.py`: `spawn_ddg`, local processes with bounded failure reporting.
"""

from highwaybp.ddg.launch import DDGProcesses, spawn_ddg, spawn_ddg_many
from highwaybp.ddg.oracle import DDGTrainer, StepResult
from highwaybp.ddg.runtime import (
    DDGRunConfig,
    DDGRuntimeError,
    EpochBatches,
    assemble_model,
    check_config,
    run_from_env,
    run_rank,
)
from highwaybp.ddg.stage import SEMANTICS, DDGStage, balanced_boundaries, make_stages, split_model
from highwaybp.distributed.transport import free_port

__all__ = [
    "SEMANTICS",
    "DDGProcesses",
    "DDGRunConfig",
    "DDGRuntimeError",
    "DDGStage",
    "DDGTrainer",
    "EpochBatches",
    "StepResult",
    "assemble_model",
    "balanced_boundaries",
    "check_config",
    "free_port",
    "make_stages",
    "run_from_env",
    "run_rank",
    "spawn_ddg",
    "spawn_ddg_many",
    "split_model",
]
