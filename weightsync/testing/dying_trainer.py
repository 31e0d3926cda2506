"""A trainer in its own process that syncs into running engines and SIGKILLs itself at a chosen
point of the sync: what an out-of-memory kill or a preemption looks like to the engines. Used by
``tests/integration/test_trainer_death.py`` and ``benchmarks/soak.py``.

    python -m weightsync.testing.dying_trainer GCS_ADDRESS NAMESPACE MODEL_DIR APPLY PHASE DELAY \
        [SEED] [ENGINE ...]

APPLY ``adapter`` syncs a LoRA adapter named ``dying`` (rank 8 on every linear layer, B drawn
from SEED) with ``sync_adapter`` instead of the model (PHASE ``adapter:stage``,
``adapter:commit``, ``adapter:settle``, or ``adapter:settle-one``: at the settle round it
settles the first ENGINE itself, then dies before settling the others). DELAY is the
seconds between reaching PHASE and the SIGKILL, or
``stop``: the trainer SIGSTOPs itself there instead (a bucket held past its deadline: a long
GC pause, a swapped-out or debugged process) and goes on when it gets SIGCONT; a sync that
failed then exits with code 3.
Its deadlines are ``DEADLINE_S`` and its lease ``LEASE_S``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

DEADLINE_S = 6.0
LEASE_S = 3.0


def main(gcs: str, namespace: str, model_dir: str, apply: str, phase: str, delay: str,
         seed: str = "4242", *names: str) -> None:
    import ray

    from weightsync.config import Deadlines, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.errors import SyncFailedError
    from weightsync.testing.models import peft_lora
    from weightsync.testing.reference import load_trainer_model, perturb_

    ray.init(address=gcs, namespace=namespace, log_to_driver=False)
    engines = [ray.get_actor(n, namespace=namespace) for n in names or ("engine-a", "engine-b")]
    d = DEADLINE_S
    deadlines = Deadlines(rendezvous=d, transfer=d, verify=d, resume=d, reload=d, lease=LEASE_S)
    cfg = TransferConfig(bucket_bytes=256 << 10, deadlines=deadlines,
                         apply="staged" if apply == "adapter" else apply)

    def die(p: str, engine) -> None:
        if phase == "adapter:settle-one" and p == "adapter:settle":
            served = ray.get(engines[0].adapter_state.remote(), timeout=d).served["dying"]
            version = int(served.rsplit("@v", 1)[1])  # committed, not yet settled
            assert ray.get(engines[0].settle_adapter.remote("dying", version), timeout=d)
            print(f"dying at {phase}: settled {served} on the first engine", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if p == phase and delay == "stop":
            print(f"stalling at {p}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)  # every thread, heartbeats included
            return
        if p == phase:
            print(f"dying at {p}", flush=True)
            threading.Timer(float(delay), os.kill, (os.getpid(), signal.SIGKILL)).start()
            if not float(delay):
                threading.Event().wait()  # the timer kills us first

    coord = SyncCoordinator(engines, cfg, on_phase=die)
    try:
        if apply == "adapter":
            coord.sync_adapter(peft_lora(model_dir, int(seed)), name="dying")
        else:
            policy = load_trainer_model(model_dir)
            perturb_(policy, scale=0.3, seed=int(seed))
            coord.sync(policy)
    except SyncFailedError as e:
        print(f"the sync failed: {e}", flush=True)
        sys.exit(3)
    print("the sync finished: the fault came too late", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
