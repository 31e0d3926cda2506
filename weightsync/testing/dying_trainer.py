"""A trainer in its own process that syncs into the test session's engines and SIGKILLs itself
at a chosen point of the sync: what an out-of-memory kill or a preemption looks like to them.

    python -m tests.integration.dying_trainer GCS_ADDRESS NAMESPACE MODEL_DIR APPLY PHASE DELAY
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def main(gcs: str, namespace: str, model_dir: str, apply: str, phase: str, delay: str) -> None:
    import ray

    from weightsync.config import Deadlines, TransferConfig
    from weightsync.coordinator import SyncCoordinator
    from weightsync.testing.reference import load_trainer_model, perturb_

    ray.init(address=gcs, namespace=namespace, log_to_driver=False)
    engines = [ray.get_actor(n, namespace=namespace) for n in ("engine-a", "engine-b")]
    policy = load_trainer_model(model_dir)
    perturb_(policy, scale=0.3, seed=4242)
    cfg = TransferConfig(bucket_bytes=256 << 10, apply=apply, deadlines=Deadlines(
        rendezvous=6, transfer=6, verify=6, resume=6, reload=6, lease=3))

    def die(p: str, engine) -> None:
        if p == phase:
            print(f"dying at {p}", flush=True)
            threading.Timer(float(delay), os.kill, (os.getpid(), signal.SIGKILL)).start()
            if not float(delay):
                threading.Event().wait()  # the timer kills us first

    coord = SyncCoordinator(engines, cfg, on_phase=die)
    coord.sync(policy)
    print("the sync finished: the kill came too late", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
