"""An on-device app that personalises its model in the background.

The main thread goes on with its own work (here: a counter standing in for an app's UI loop)
while a :class:`edgezo.Personalizer` fits on the user's notes in a worker thread, reporting
progress through a callback. Midway the app pauses personalisation for a moment (say, the user
opened something heavy), resumes it, and finally cancels it; a second ``fit`` picks up where
the first stopped. At the end it scores a few texts with the personalised weights.

Usage::

    python tools/example_app.py --bundle /tmp/smol-lora --device laptop-cpu --steps 30
    python tools/example_app.py            # the default SmolLM2-135M LoRA bundle

State (ledger, checkpoint, trained tensors) lives in --app-dir; run it twice and the second
run resumes the first.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from edgezo import Personalizer
from edgezo.defaults import default_data, ensure_default_bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: SmolLM2 LoRA)")
    ap.add_argument("--device", default="laptop-cpu", help="device profile")
    ap.add_argument("--app-dir", default="runs/example-app", help="the app's edgezo state")
    ap.add_argument("--steps", type=int, default=30, help="the personalisation's total steps")
    ap.add_argument("--eval-budget", type=int, default=None, help="forward evaluations/session")
    args = ap.parse_args()

    notes = [json.loads(line) for line in default_data()[0].read_text().splitlines() if line]
    bundle = args.bundle or ensure_default_bundle()
    p = Personalizer(
        bundle, args.device, args.app_dir, batch_size=4, max_length=64, eval_batch_size=8
    )
    probe = ["I water the basil on the balcony every morning.", "Quarterly revenue rose 4%."]
    print(f"app: loss of two texts before: {[round(x, 3) for x in p.score(probe)]}")

    halfway = threading.Event()

    def on_progress(pr) -> None:  # called in the worker thread after every step
        left = "" if pr.evaluations_left is None else f", {pr.evaluations_left} evals left"
        print(
            f"  [edgezo] step {pr.step}/{pr.steps} loss {pr.loss:.3f} "
            f"({pr.evaluations} evaluations this session{left})",
            flush=True,
        )
        if pr.step >= pr.steps // 2:
            halfway.set()

    t0 = time.time()
    p.fit(notes, steps=args.steps, eval_budget=args.eval_budget, on_progress=on_progress)
    ticks, interrupted = 0, False
    while p.running:  # the app's own work goes on in the main thread
        ticks += 1
        if halfway.is_set() and not interrupted:
            interrupted = True
            print("app: pausing personalisation for 1 s (the user needs the CPU)")
            p.pause()
            time.sleep(1.0)
            print("app: resuming")
            p.resume()
            time.sleep(0.5)
            print("app: cancelling (the user closed the app); the next fit resumes")
            p.cancel()
        time.sleep(0.25)
    s = p.wait()
    print(
        f"app: fit stopped ({s.stop_reason}) at step {s.steps} after {time.time() - t0:.1f} s; "
        f"main thread did {ticks} ticks meanwhile"
    )
    if s.steps < args.steps:
        s = p.fit(notes, steps=args.steps, on_progress=on_progress).wait()
        print(
            f"app: second fit: {s.stop_reason} at step {s.steps}; held-out loss "
            f"{s.heldout_before:.3f} -> {s.heldout_after:.3f}"
        )
    print(f"app: loss of two texts after: {[round(x, 3) for x in p.score(probe)]}")


if __name__ == "__main__":
    main()
