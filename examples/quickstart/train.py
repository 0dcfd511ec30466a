"""A small, real training loop for runctl's quickstart: linear regression by gradient
descent in plain Python (no GPU, no packages). It prints progress, writes a checkpoint into
$RUNCTL_CHECKPOINT_DIR every few epochs (write to a temporary name, then rename, so a
checkpoint is never seen half-written), resumes from $RUNCTL_RESUME_FROM when given one,
and exits cleanly on SIGTERM after saving."""

import json
import os
import random
import signal
import sys
import time

EPOCHS = int(os.environ.get("EPOCHS", "20"))
STEP_SECONDS = float(os.environ.get("STEP_SECONDS", "0.15"))
# Simulates a crash at this epoch (first attempt only), to try `run --restart on-failure`.
CRASH_AT_EPOCH = int(os.environ.get("CRASH_AT_EPOCH", "0"))
CHECKPOINT_EVERY = 5

stop_requested = False


def on_sigterm(signum, frame):
    global stop_requested
    stop_requested = True
    print("received SIGTERM: saving a checkpoint and exiting", flush=True)


def make_data(n=256, seed=0):
    rng = random.Random(seed)
    xs = [rng.uniform(-1, 1) for _ in range(n)]
    ys = [3.0 * x + 0.5 + rng.gauss(0, 0.05) for x in xs]
    return xs, ys


def save_checkpoint(directory, epoch, w, b, loss):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"ckpt-{epoch:04d}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"epoch": epoch, "w": w, "b": b, "loss": loss}, f)
    os.replace(tmp, path)
    return path


def main():
    signal.signal(signal.SIGTERM, on_sigterm)
    ckpt_dir = os.environ.get("RUNCTL_CHECKPOINT_DIR", "checkpoints")
    run_id = os.environ.get("RUNCTL_RUN_ID", "local")
    xs, ys = make_data()
    w, b, start = 0.0, 0.0, 1
    resume = os.environ.get("RUNCTL_RESUME_FROM")
    if resume:
        with open(resume) as f:
            state = json.load(f)
        w, b, start = state["w"], state["b"], state["epoch"] + 1
        print(f"resumed from {resume} at epoch {start}")
    print(f"run {run_id}: training for {EPOCHS} epochs, checkpoints in {ckpt_dir}")
    lr = 0.5
    loss = float("nan")
    for epoch in range(start, EPOCHS + 1):
        n = len(xs)
        grad_w = sum(2 * (w * x + b - y) * x for x, y in zip(xs, ys)) / n
        grad_b = sum(2 * (w * x + b - y) for x, y in zip(xs, ys)) / n
        w -= lr * grad_w
        b -= lr * grad_b
        loss = sum((w * x + b - y) ** 2 for x, y in zip(xs, ys)) / n
        print(f"epoch {epoch:3d}/{EPOCHS}  loss {loss:.5f}  w {w:.3f}  b {b:.3f}")
        if epoch % CHECKPOINT_EVERY == 0 or epoch == EPOCHS or stop_requested:
            path = save_checkpoint(ckpt_dir, epoch, w, b, loss)
            print(f"saved checkpoint {os.path.basename(path)}")
        if stop_requested:
            sys.exit(143)
        if epoch == CRASH_AT_EPOCH and not resume:
            print(f"simulated crash at epoch {epoch}", file=sys.stderr, flush=True)
            sys.exit(1)
        time.sleep(STEP_SECONDS)
    print(f"done: w={w:.3f} b={b:.3f} (true 3.000, 0.500), final loss {loss:.5f}")


if __name__ == "__main__":
    main()
