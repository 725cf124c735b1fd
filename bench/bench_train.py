"""Training throughput, start-up time and memory of ocec's pipeline, against a conventional one and
against the compute limit, measured in one run on the same data. A benchmark, not a test.

    python bench/bench_train.py                          # 50,000 rows, CPU, batch 256 and 1024
    python bench/bench_train.py --rows 400000 --data /tmp/b400
    python bench/bench_train.py --device cuda --batch_sizes 1024,4096,8192
    python bench/bench_train.py --architectures         # a row per architecture: parameters, img/s

Each measurement runs in its own process (clean peak RSS, no warm caches carried over):
  synth         `ocec synth --style b --shards 8` of --rows (skipped with an existing --data folder)
  cold start    read the parquet, decode every PNG, write the decode cache, then one training step
  warm start    the same with the cache in place: to the first training step
  ours          training images/s of the real loop (trainer.train_one_epoch: gather, augment on the
                device, forward, backward, fused AdamW), after --warmup steps
  conventional  what users run today: a torch Dataset that decodes each PNG with PIL and applies
                torchvision transforms per sample, through a DataLoader with --workers processes;
                same model, batch and optimizer (default glibc allocator, as users run it)
  compute       forward + backward + optimizer step on one batch already resident on the device
Peak RSS is compared with the decoded tensor's size (rows x 3 x 32 x 64 bytes). It prints a table
with the ratios ours / conventional and ours / compute, and writes the numbers as JSON (--json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = (32, 64)


# --- the measurements, each run in a child process ------------------------------------------------


class StopAfter:
    """Stands in for the trainer's StopFlag: lets `steps` steps run, then asks the loop to stop."""

    def __init__(self, steps: int):
        self.left = steps

    @property
    def signum(self):
        self.left -= 1
        return None if self.left >= 0 else 0


def run_steps(job, steps: int, position: tuple) -> tuple:
    """`steps` steps of the real training loop from (epoch, EpochState or None), across epochs."""
    from ocec.training.trainer import continue_epoch, train_one_epoch

    epoch, state = position
    while steps > 0:
        before = state.step if state is not None else 0
        if state is None:
            state = train_one_epoch(job, epoch, StopAfter(steps))
        else:
            state = continue_epoch(job, epoch, state, StopAfter(steps))
        steps -= state.step - before
        if state.finished:
            epoch, state = epoch + 1, None
    return epoch, state


def _settings(args, cache: str) -> dict:
    return dict(
        data_root=args.data,
        cache_dir=cache,
        num_workers=args.workers,
        batch_size=args.batch_size,
        device=args.device,
        output_dir=tempfile.mkdtemp(),
        epochs=1,
        warmup_epochs=0,
    )


def phase_ocec(args) -> dict:
    """Start-up (cold or warm, by the cache's state) to the first step, then steps/s of the real loop."""
    import torch

    from ocec.data.dataset import load_training_data
    from ocec.data.sampling import TrainingPool, steps_per_epoch
    from ocec.engine.optim import Learner
    from ocec.engine.runtime import amp_dtype, keep_freed_memory, resolve_device
    from ocec.training.job import Job
    from ocec.training.start import plan_start

    tic = time.perf_counter()
    start = plan_start(_settings(args, args.cache))
    cfg = start.cfg
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    data = load_training_data(cfg, start.model_cfg.image_size)
    loaded = time.perf_counter() - tic
    torch.manual_seed(0)
    learner = Learner.build(start.model_cfg, cfg, steps_per_epoch(len(data.train), cfg.batch_size), device)
    pool = TrainingPool.build([data.train], None, mix_ratio=0.0, balance=cfg.balance, device=device)
    job = Job(cfg, start.model_cfg, learner, pool, data, device, amp_dtype(device, cfg.use_amp), Path(cfg.output_dir))
    position = run_steps(job, 1, (1, None))
    _sync(device)
    first_step = time.perf_counter() - tic
    rate = None
    steps = (
        args.steps if args.steps >= 0 else steps_per_epoch(len(data.train), cfg.batch_size) - 1
    )  # -1: the rest of epoch 1
    if steps:
        position = run_steps(job, args.warmup if args.steps >= 0 else 0, position)
        _sync(device)
        t = time.perf_counter()
        run_steps(job, steps, position)
        _sync(device)
        rate = steps * cfg.batch_size / (time.perf_counter() - t)
    return {
        "load_s": loaded,
        "first_step_s": first_step,
        "images_per_s": rate,
        "train_rows": len(data.train),
        "peak_rss_gb": _peak_rss_gb(),
        **_rss_parts(),
    }


def phase_conventional(args) -> dict:
    """The per-sample design: PIL decode + torchvision transforms in DataLoader workers, every epoch."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from torchvision import transforms

    from ocec.core.config import ModelConfig
    from ocec.data.parquet import find_parquet_files
    from ocec.models.model import build_model

    class PerSampleDataset(torch.utils.data.Dataset):
        def __init__(self, files):
            self.files = files
            self.rows = None  # read lazily in each worker, like a dataframe the worker holds
            self.count = sum(pq.read_metadata(f).num_rows for f in files)
            self.transform = transforms.Compose(
                [
                    transforms.Resize(SIZE),
                    transforms.RandomHorizontalFlip(),
                    transforms.ColorJitter(0.25, 0.25, 0.25),
                    transforms.RandomAffine(0, translate=(0.06, 0.06), scale=(0.92, 1.08)),
                    transforms.ToTensor(),
                ]
            )

        def __len__(self):
            return self.count

        def __getitem__(self, i):
            if self.rows is None:
                self.rows = [
                    r for f in self.files for r in pq.read_table(f, columns=["image_bytes", "class_id"]).to_pylist()
                ]
            row = self.rows[i]
            image = Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")
            return self.transform(image), row["class_id"]

    device = torch.device(_device(args.device))
    if args.tuned_step and device.type == "cpu":
        from ocec.engine.runtime import keep_freed_memory

        keep_freed_memory()
    dataset = PerSampleDataset(find_parquet_files(args.data))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    torch.manual_seed(0)
    layout = torch.channels_last if args.tuned_step else torch.contiguous_format
    model = build_model(ModelConfig()).to(device, memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=bool(args.tuned_step))
    batches = (batch for _ in iter(int, 1) for batch in loader)  # epoch after epoch

    def step():
        x, y = next(batches)
        x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
        loss, _ = model.margin_head.training_loss(model.embed(x), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {"images_per_s": _images_per_s(step, args, device), "peak_rss_gb": _peak_rss_gb()}


def resident_setup(args, **model_config):
    """A model (channels-last), fused AdamW and one batch already on --device: the compute-limit setting."""
    import torch

    from ocec.core.config import ModelConfig
    from ocec.engine.optim import build_optimizer
    from ocec.engine.runtime import keep_freed_memory
    from ocec.models.model import build_model

    device = torch.device(_device(args.device))
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(0)
    model = build_model(ModelConfig(**model_config)).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, {"backbone": 1e-3, "head": 1e-3, "margin_head": 1e-3}, 1e-4)
    x = torch.rand(args.batch_size, 3, *SIZE, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch_size,), device=device)

    def step():
        loss, _ = model.margin_head.training_loss(model.embed(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, x, step, device


def phase_compute(args) -> dict:
    """The compute limit: one batch resident on the device, forward + backward + fused AdamW."""
    _, _, step, device = resident_setup(args)
    return {"images_per_s": _images_per_s(step, args, device)}


# Every architecture upstream's trainer builds, at its default size (base 32, 4 blocks, 32x64): what capacity
# costs. convnext's transformer head needs a grid that divides its 4x8 map (upstream's README uses 2x4).
ARCHITECTURES = {
    "baseline/avg": {},
    "baseline/avgmax_mlp": {"head_variant": "avgmax_mlp"},
    "inverted_se/avg": {"arch_variant": "inverted_se", "head_variant": "avg"},
    "inverted_se/avgmax_mlp": {"arch_variant": "inverted_se", "head_variant": "avgmax_mlp"},
    "convnext/avg": {"arch_variant": "convnext", "head_variant": "avg"},
    "convnext/transformer": {"arch_variant": "convnext", "head_variant": "transformer", "token_mixer_grid": (2, 4)},
    "convnext/mlp_mixer": {"arch_variant": "convnext", "head_variant": "mlp_mixer", "token_mixer_grid": (2, 4)},
    "baseline/transformer": {"head_variant": "transformer", "token_mixer_grid": (2, 4)},
}


def phase_architecture(args) -> dict:
    """One architecture (--arch): parameters, training images/s on a resident batch (forward + backward +
    fused AdamW) and inference images/s (eval, no gradients), on --device."""
    import torch

    model, x, train_step, device = resident_setup(args, **ARCHITECTURES[args.arch])

    def infer_step():
        with torch.inference_mode():
            model(x)

    train = _images_per_s(train_step, args, device)
    model.eval()
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images_per_s": train,
        "infer_images_per_s": _images_per_s(infer_step, args, device),
    }


def architecture_table(args) -> str:
    """A row per architecture, each measured in its own process; ratios against baseline/avg of this run."""
    rows = {name: child("architecture", args, arch=name) for name in ARCHITECTURES}
    base = rows["baseline/avg"]
    lines = [
        f"architectures at 32x64, base 32, 4 blocks, batch {args.batch_size}, {_device(args.device)}:",
        f"{'architecture':<24}{'parameters':>11}{'train img/s':>13}{'x baseline':>11}"
        f"{'infer img/s':>13}{'x baseline':>11}",
    ]
    for name, r in rows.items():
        lines.append(
            f"{name:<24}{r['parameters']:>11,}{r['train_images_per_s']:>13,.0f}"
            f"{r['train_images_per_s'] / base['train_images_per_s']:>11.2f}{r['infer_images_per_s']:>13,.0f}"
            f"{r['infer_images_per_s'] / base['infer_images_per_s']:>11.2f}"
        )
    Path(args.json).write_text(json.dumps({"architectures": rows, "batch_size": args.batch_size}, indent=1))
    return "\n".join(lines)


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _images_per_s(step, args, device) -> float:
    """Training images per second of `step`, timed over --steps after --warmup untimed ones."""
    for _ in range(args.warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - t)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _rss_parts() -> dict:
    """Resident memory now, by kind: anonymous (heap, tensors) and file-backed (the memory-mapped decode
    cache and shared libraries: page cache, shared between processes, reclaimable)."""
    parts = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                parts[f"{key[3:].lower()}_rss_gb"] = int(value.split()[0]) / 2**20
    return parts


PHASES = {
    "ocec": phase_ocec,
    "conventional": phase_conventional,
    "compute": phase_compute,
    "architecture": phase_architecture,
}


# --- the driver -------------------------------------------------------------------------------------


def child(phase: str, args, **overrides) -> dict:
    """Run one phase in a fresh process; returns its measurements (and its wall time)."""
    values = {**vars(args), **overrides}
    argv = [sys.executable, __file__, "--phase", phase]
    for key in ("data", "cache", "device", "batch_size", "workers", "steps", "warmup", "tuned_step", "arch"):
        argv += [f"--{key}", str(values[key])]
    tic = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"bench phase {phase} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - tic}


def synthesise(rows: int, folder: Path, workers: int) -> dict:
    tic = time.perf_counter()
    argv = [sys.executable, "-m", "ocec", "synth", "--out", str(folder), "--rows", str(rows), "--style", "b"]
    argv += ["--shards", "8", "--seed", "0", "--num_workers", str(workers)]
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    usage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"seconds": time.perf_counter() - tic, "peak_rss_gb": usage}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=50_000, help="rows to synthesise (ignored with --data)")
    parser.add_argument("--data", help="an existing parquet folder to use instead of synthesising one")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch_sizes", default="256,1024", help="comma-separated, e.g. 1024,4096,8192 on a GPU")
    parser.add_argument("--workers", type=int, default=2, help="decode processes / DataLoader workers")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per measurement")
    parser.add_argument("--no_epoch", action="store_true", help="skip the full epoch (memory after every row was read)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--skip_conventional", action="store_true", help="leave out the conventional pipeline")
    parser.add_argument("--json", default="bench_train.json", help="where to write the numbers")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--tuned_step", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--report", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    parser.add_argument(
        "--architectures", action="store_true", help="instead: a row per architecture (parameters, img/s)"
    )
    parser.add_argument("--arch", default="baseline/avg", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    if args.phase:  # a child: measure one thing, print it as JSON
        print(json.dumps(PHASES[args.phase](args)))
        return
    if args.architectures:
        print(architecture_table(args))
        return

    workdir = Path(tempfile.mkdtemp(prefix="ocec-bench-"))
    result = {"device": _device(args.device), "cpus": os.cpu_count(), "batch_sizes": args.batch_sizes}
    if args.data is None:
        args.data = str(workdir / "data")
        result["synth"] = synthesise(args.rows, Path(args.data), args.workers)
    args.cache = str(workdir / "cache")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    cold = child("ocec", args, batch_size=sizes[0], steps=0)
    warm = child("ocec", args, batch_size=sizes[0], steps=0)
    import pyarrow.parquet as pq

    from ocec.data.parquet import find_parquet_files

    rows = sum(pq.read_metadata(f).num_rows for f in find_parquet_files(args.data))
    decoded_gb = rows * 3 * SIZE[0] * SIZE[1] / 2**30
    result.update(rows=rows, decoded_gb=decoded_gb, cold=cold, warm=warm, batches={})
    if not args.no_epoch:  # a whole epoch: every training row read once, memory at its steady state
        result["epoch"] = child("ocec", args, batch_size=sizes[0], steps=-1)
    for batch in sizes:
        entry = {"ours": child("ocec", args, batch_size=batch), "compute": child("compute", args, batch_size=batch)}
        if not args.skip_conventional:
            entry["conventional"] = child("conventional", args, batch_size=batch)
            entry["conventional_tuned_step"] = child("conventional", args, batch_size=batch, tuned_step=1)
        result["batches"][batch] = entry
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"\nnumbers: {args.json}; data and cache: {workdir}")


def report(r: dict) -> str:
    lines = [
        f"ocec training benchmark: {r['rows']:,} rows of 32x64 (decoded {r['decoded_gb']:.2f} GiB), "
        f"device {r['device']}, {r['cpus']} CPUs"
    ]
    if "synth" in r:
        lines.append(
            f"synth                 {r['synth']['seconds']:8.1f} s   peak RSS {r['synth']['peak_rss_gb']:.2f} GiB"
        )
    for name in ("cold", "warm"):
        c = r[name]
        rate = f"   decode {r['rows'] / c['load_s']:,.0f} img/s" if name == "cold" else ""
        lines.append(
            f"{name} start to step 1  {c['first_step_s']:8.1f} s   (data {c['load_s']:.1f} s){rate}   "
            f"peak RSS {c['peak_rss_gb']:.2f} GiB = decoded + {c['peak_rss_gb'] - r['decoded_gb']:.2f} GiB"
        )
    if "epoch" in r:
        e = r["epoch"]
        lines.append(
            f"one epoch, batch {r['batch_sizes'].split(',')[0]}: {e['train_rows']:,} rows at "
            f"{e['images_per_s']:,.0f} img/s, "
            f"peak RSS {e['peak_rss_gb']:.2f} GiB = decoded + {e['peak_rss_gb'] - r['decoded_gb']:.2f} GiB "
            f"(at its end {e['anon_rss_gb']:.2f} GiB anonymous + {e['file_rss_gb']:.2f} GiB file-backed)"
        )
    lines += [
        "",
        "images/s per batch size (conv: the conventional pipeline as users run it; conv*: feeding our tuned step)",
    ]
    header = ["batch", "ours", "conv", "conv*", "compute", "ours/conv", "ours/conv*", "ours/compute", "peak RSS"]
    lines.append(" ".join(f"{h:>12}" for h in header))
    for batch, e in r["batches"].items():
        ours, compute = e["ours"]["images_per_s"], e["compute"]["images_per_s"]
        conv = e.get("conventional", {}).get("images_per_s")
        tuned = e.get("conventional_tuned_step", {}).get("images_per_s")
        cells = [batch, f"{ours:,.0f}", f"{conv or 0:,.0f}", f"{tuned or 0:,.0f}", f"{compute:,.0f}"]
        cells += [
            f"{ours / conv:.2f}" if conv else "-",
            f"{ours / tuned:.2f}" if tuned else "-",
            f"{ours / compute:.2f}",
        ]
        cells.append(f"{e['ours']['peak_rss_gb']:.2f} GiB")
        lines.append(" ".join(f"{c:>12}" for c in cells))
    rates = [e["ours"]["images_per_s"] for e in r["batches"].values()]
    if len(rates) > 1:
        lines.append(f"ours, largest / smallest batch: {rates[-1] / rates[0]:.2f}x images/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
