"""Gate benchmark: the stability gate's scenarios (issue 15) run in-process, and what the gate costs.

    .venv/bin/python benchmarks/bench_gate.py [--quick] [--rounds 6] [--teacher PATH]

Scenarios. Each builds its trainer as `serve` does (vmafx_sidecar.build_trainer: a fresh 6-16-1 model, a
temporary checkpoint directory), feeds it through Trainer.ingest, job_ids deciding what is held out as on
the socket, and prints every checkpoint: its verdict, the window's and the history's sizes, the
candidate's and each reference's PLCC / R² / RMSE on both sets, and the reason. The scores come from the
VMAF v0.6.1 model (--teacher, the JSON vmaf ships: a libsvm nu-SVR with an RBF kernel over adm2, motion2
and vif_scale0..3, predicted here in numpy) for feature vectors drawn in its normalised [0, 1] space; a
smooth ridge stands in when the file is missing. The scenarios are those tests/test_gate_scenarios.py and
tests/test_gate_stream.py run over the socket, with their settings:
  ratchet   a converged model restarted with five times the learning rate and a lighter EMA
  fresh     a fresh model at the default learning rate and EMA, a checkpoint every 256 samples
  burst     100 - score for two checkpoint intervals, late (held-out ring judged) and early (history
            topped up with replayed samples), then clean data until publishing resumes
  shift     content with adm2 in its bottom 5 % (heavy detail loss), then content with adm2 in its top half
  low-rate  the default checkpoint settings: the first checkpoint's window

Costs, at the default sizes (80 features, 64 hidden, batch 32 = 16 new + 16 replayed):
  validation   µs per ingested sample with progressive validation (three distinct reference models) and
               with Trainer.validate replaced by a no-op, the two alternating in rounds side by side, each
               round reported: the machine's speed drifts, so compare within a round. Target: <= 5 µs.
  checkpoint   vmafx_sidecar.publish (the evidence on both sets, the verdict, the file written and fsynced,
               read back by onnx's reference evaluator, placed) with a full eval ring (2000), after a first
               checkpoint. Target: < 20 ms.

--quick shortens the scenarios and the rounds: a smoke run of every path, for tests (under 20 s).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vmafx_sidecar as vs  # noqa: E402  before numpy: it pins BLAS to one thread, as in the server

import numpy as np  # noqa: E402
from bench_ingest import machine, markdown_table  # noqa: E402
from vmaf_teacher import N_FEATURES, VMAF_MODEL, VmafTeacher  # noqa: E402

SEED = 3  # of the streams and the test sets; the trainers use VMAFX_SIDECAR_SEED's default
Teacher = Callable[[np.ndarray], np.ndarray]

# The scenarios' settings, as the tests set them: a small model that learns in a few thousand samples.
FAST = dict(n_features=N_FEATURES, hidden=16, batch_size=16, lr=0.05, warmup_steps=10, ema_decay=0.95,
            ckpt_interval_s=0.0, min_samples_ckpt=400, holdout_fraction=0.2, gate_min_eval=100, keep_checkpoints=0)
DEFAULTS = dict(n_features=N_FEATURES, hidden=16, ckpt_interval_s=0.0, keep_checkpoints=0)
BURST = dict(n_features=N_FEATURES, hidden=16, batch_size=16, lr=0.2, warmup_steps=10, ema_decay=0.5,
             ckpt_interval_s=0.0, min_samples_ckpt=320, gate_min_eval=100, gate_max_plcc_drop=0.1, gate_max_r2_drop=0.2,
             keep_checkpoints=0)


# ---- teachers ----

def ridge_teacher() -> Teacher:
    """A smooth stand-in: 60 + 30 tanh of a fixed projection (tests/test_gate_stream.py's target)."""
    weights = np.random.default_rng(1).normal(0, 1, N_FEATURES)
    return lambda x: 60 + 30 * np.tanh((x - 0.5) @ weights / 1.5)


def content(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Feature vectors of one kind, uniform in [0, 1] but for adm2 (the first): in its top half for "new"
    content, its bottom 5 % for "old" in the shift (a model trained there never learns what adm2 does)."""
    x = rng.uniform(0, 1, (n, N_FEATURES))
    if kind == "old":
        x[:, 0] *= 0.05
    elif kind == "new":
        x[:, 0] = 0.5 + 0.5 * x[:, 0]
    return x


# ---- a scenario's run ----

@dataclasses.dataclass
class Written:
    phase: str
    record: dict


class Run:
    """One trainer built as `serve` builds it, fed samples as the socket feeds them; remembers each
    checkpoint's record."""

    def __init__(self, directory: Path, teacher: Teacher, settings: dict):
        self.directory, self.teacher = directory, teacher
        self.rng = np.random.default_rng(SEED)
        self.trainer = self.build(settings)
        self.n_sent = 0
        self.written: list[Written] = []

    def build(self, settings: dict) -> vs.Trainer:
        self.settings = settings
        trainer, _ = vs.build_trainer(vs.Config(checkpoint_dir=str(self.directory), base_model_path="", **settings))
        return trainer

    def restart(self, **changes) -> None:
        """A new trainer on the same directory and saved state, with `changes` to the settings."""
        state = self.trainer.state_dict()
        self.trainer = self.build({**self.settings, **changes})
        self.trainer.load_state_dict(state)

    def feed(self, phase: str, n: int, kind: str = "any", mislabelled: bool = False,
             until: Callable[[Written], bool] | None = None) -> Written | None:
        """Send up to n samples of a kind (scores 100 - score if mislabelled); stop at the first checkpoint
        `until` accepts, and return it."""
        x = content(self.rng, n, kind)
        y = self.teacher(x)
        if mislabelled:
            y = 100 - y
        t = self.trainer
        for features, score in zip(x.astype(np.float32), y.astype(np.float32)):
            self.n_sent += 1
            result = t.ingest(features, score, t.is_held_out(f"{phase}-{self.n_sent}"), False)
            if result and result.checkpoint:
                self.written.append(Written(phase, result.checkpoint.record))
                if until and until(self.written[-1]):
                    return self.written[-1]
        return None


def any_checkpoint(_: Written) -> bool:
    return True


def published(w: Written) -> bool:
    return w.record["gate"] in vs.PUBLISHED


def ratchet(run: Run, scale: float) -> None:
    run.feed("converge", int(6000 * scale))
    run.restart(lr=0.25, ema_decay=0.9)
    run.feed("walk", int(36000 * scale))


def fresh(run: Run, scale: float) -> None:
    run.feed("fresh", int(6000 * scale))


def burst(run: Run, scale: float, n_clean: int) -> None:
    run.feed("clean", int(n_clean * scale))
    run.feed("clean", 6000, until=published)
    for _ in range(2):
        run.feed("burst", 1000, mislabelled=True, until=any_checkpoint)
    if run.feed("recovery", 6000, until=published):
        run.feed("recovery", 1000, until=any_checkpoint)


def shift(run: Run, scale: float) -> None:
    run.feed("old", int(6000 * scale), kind="old")
    run.feed("new", int(4000 * scale), kind="new")


def low_rate(run: Run, scale: float) -> None:
    run.feed("low", 2000, until=any_checkpoint)


SCENARIOS = {  # name: (what it is, settings, how it runs)
    "ratchet": ("a converged model, restarted with LR 0.25 (from 0.05) and EMA 0.9 (from 0.95); tolerance 0.002",
                {**FAST, "replay_capacity": 2000, "gate_max_plcc_drop": 0.002}, ratchet),
    "fresh": ("a fresh model, default LR and EMA, a checkpoint every 256 samples",
              {**DEFAULTS, "min_samples_ckpt": 256, "holdout_fraction": 0.05}, fresh),
    "burst-late": ("100 - score for two intervals after 3000 clean samples (a fifth held out)",
                   {**BURST, "holdout_fraction": 0.2, "replay_capacity": 256},
                   lambda run, scale: burst(run, scale, 3000)),
    "burst-early": ("100 - score for two intervals after the first published checkpoint (a twentieth held out)",
                    {**BURST, "holdout_fraction": 0.05, "replay_capacity": 1000},
                    lambda run, scale: burst(run, scale, 0)),
    "shift": ("old content (adm2 < 0.05), then new content (adm2 > 0.5), correctly scored; tolerance 0.005",
              {**FAST, "gate_max_plcc_drop": 0.005}, shift),
    "low-rate": ("default checkpoint settings (MIN_SAMPLES_CKPT 1000, GATE_MIN_EVAL 200, 5 % held out)",
                 {**DEFAULTS, "holdout_fraction": 0.05}, low_rate),
}


# ---- the report ----

def scores_text(scores: dict | None) -> str:
    return "-" if scores is None else f"{scores['plcc']:.4f} / {scores['r2']:.3f} / {scores['rmse']:.2f}"


def print_scenario(name: str, about: str, written: list[Written], seconds: float) -> None:
    print(f"\n### {name}: {about}\n\n{len(written)} checkpoints, "
          f"{sum(published(w) for w in written)} published, in {seconds:.1f} s. "
          "Scores: PLCC / R² / RMSE; history n: held out + replayed.\n")
    rows = []
    for w in written:
        metrics = w.record["metrics"]
        for evidence in ("window", "history"):
            scores = metrics[evidence]
            n = str(scores["n"]) if evidence == "window" else f"{scores['n']} ({scores['held_out']} held out)"
            first = evidence == "window"
            rows.append([str(w.record["version"]) if first else "", w.phase if first else "",
                         w.record["gate"] if first else "", evidence, n, scores_text(scores["candidate"]),
                         *(scores_text(scores[r]) if r in scores else "" for r in vs.REFERENCES)])
    markdown_table(["version", "phase", "gate", "set", "n", "candidate", *vs.REFERENCES], rows)
    print()
    for w in written:
        print(f"v{w.record['version']}: {w.record['reason']}")


def run_scenarios(teacher: Teacher, scale: float) -> None:
    for name, (about, settings, script) in SCENARIOS.items():
        with tempfile.TemporaryDirectory(prefix=f"vmafx-bench-gate-{name}-") as tmp:
            run = Run(Path(tmp), teacher, settings)
            started = time.perf_counter()
            script(run, scale)
            print_scenario(name, about, run.written, time.perf_counter() - started)


# ---- what the gate costs ----

def default_trainer(directory: str, **settings) -> vs.Trainer:
    config = vs.Config(checkpoint_dir=directory, base_model_path="", min_samples_ckpt=10**15, **settings)
    return vs.build_trainer(config)[0]


def ingest_seconds(trainer: vs.Trainer, x: np.ndarray, y: np.ndarray) -> float:
    started = time.perf_counter()
    for features, score in zip(x, y):
        trainer.ingest(features, score, False, False)
    return time.perf_counter() - started


def validate_call_us(trainer: vs.Trainer, x: np.ndarray, y: np.ndarray, calls: int = 2000) -> float:
    """µs per sample of Trainer.validate alone on one step's new samples."""
    model_x, model_y = x.copy(), y.copy()
    trainer.standardize(model_x, model_y)
    started = time.perf_counter()
    for _ in range(calls):
        trainer.validate(x, model_x, y)
    return (time.perf_counter() - started) / calls / len(y) * 1e6


def measure_validation(rounds: int, samples: int, block: int = 1000) -> list[tuple[float, float, float]]:
    """Per round: µs per ingested sample with progressive validation and with a no-op in its place, over
    blocks that alternate between the two (so that a drift in the machine's speed hits both alike), and
    validate() timed alone."""
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory(prefix="vmafx-bench-gate-validation-") as tmp:
        trainer = default_trainer(tmp)
        references = {name: vs.MLP.initial(trainer.model.sizes, vs.Activation("relu"), np.random.default_rng(i))
                      for i, name in enumerate(vs.REFERENCES)}
        trainer.references = lambda: references  # three distinct models: the most a step ever runs
        validate = trainer.validate
        x = rng.uniform(0, 1, (samples, trainer.config.n_features)).astype(np.float32)
        y = rng.uniform(20, 100, samples).astype(np.float32)
        ingest_seconds(trainer, x, y)  # warm: a full pass before the clock
        results = []
        for r in range(rounds):
            seconds = {True: 0.0, False: 0.0}  # with validation, without
            for b, start in enumerate(range(0, samples, block)):
                on = (b + r) % 2 == 0
                trainer.validate = validate if on else (lambda x, model_x, y: None)
                seconds[on] += ingest_seconds(trainer, x[start:start + block], y[start:start + block])
            trainer.validate = validate
            alone = validate_call_us(trainer, x[:trainer.n_new], y[:trainer.n_new])
            results.append((seconds[True] / (samples / 2) * 1e6, seconds[False] / (samples / 2) * 1e6, alone))
        return results


def measure_checkpoint(runs: int) -> tuple[list[float], list[float], str]:
    """ms of gather_evidence + judge, and of the whole Trainer.take_checkpoint (the same evidence and
    verdict, then vmafx_sidecar.publish's write, read-back and placing), per checkpoint after a first. The
    held-out scores are a fixed random model's and the candidate is that model, so every checkpoint passes
    and is written, read back and published."""
    with tempfile.TemporaryDirectory(prefix="vmafx-bench-gate-checkpoint-") as tmp:
        trainer = default_trainer(tmp)
        c = trainer.config
        teacher = vs.MLP.initial(trainer.model.sizes, vs.Activation("relu"), np.random.default_rng(SEED))
        x = np.random.default_rng(SEED).uniform(0, 1, (c.eval_capacity, c.n_features)).astype(np.float32)
        for features, score in zip(x, teacher.forward(x)[:, 0]):  # a full eval ring
            trainer.add(features, score, held_out=True)
        trainer.ema.flat[...] = teacher.flat
        # The first: the incumbent and the champion from now on. The window stays empty; its evidence is a
        # few sums, whatever its size.
        trainer.take_checkpoint()
        gate_ms, checkpoint_ms, verdicts = [], [], set()
        for _ in range(runs):
            started = time.perf_counter()
            window, history, _ = vs.gather_evidence(trainer, vs.MLP.from_weights(trainer.raw_weights(trainer.ema)))
            vs.judge(c, window, history)
            gate_ms.append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            verdicts.add(trainer.take_checkpoint().record["gate"])
            checkpoint_ms.append((time.perf_counter() - started) * 1e3)
        shape = (f"{'-'.join(map(str, trainer.model.sizes))}, history {history.n} held-out samples, "
                 f"verdicts: {', '.join(sorted(verdicts))}")
        return gate_ms, checkpoint_ms, shape


def print_validation(rounds: int, samples: int) -> None:
    print(f"\n### progressive validation, 80-64-1, batch 32 (16 new), three references: µs per ingested sample "
          f"({samples // 2} samples each way a round, in alternating blocks of 1000)\n")
    results = measure_validation(rounds, samples)
    markdown_table(["round", "with validation", "validate() a no-op", "overhead", "validate() alone"],
                   [[str(r + 1), f"{on:.2f}", f"{off:.2f}", f"{on - off:+.2f}", f"{alone:.2f}"]
                    for r, (on, off, alone) in enumerate(results)])
    print(f"\nmedian overhead {statistics.median(on - off for on, off, _ in results):+.2f} µs per sample, "
          f"validate() alone {statistics.median(alone for *_, alone in results):.2f} (target <= 5)")


def print_checkpoint(checkpoints: int) -> None:
    gate_ms, checkpoint_ms, shape = measure_checkpoint(checkpoints)
    print(f"\n### checkpoint: {shape}\n")
    markdown_table(["checkpoint", "evidence + verdict (ms)",
                    "take_checkpoint: evidence, verdict, write, read back (ms)"],
                   [[str(i + 2), f"{g:.2f}", f"{t:.2f}"] for i, (g, t) in enumerate(zip(gate_ms, checkpoint_ms))])
    print(f"\nmedian checkpoint {statistics.median(checkpoint_ms):.2f} ms, max {max(checkpoint_ms):.2f} ms "
          "(target < 20)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short scenarios and rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=6, help="validation rounds (default 6; --quick: 2)")
    parser.add_argument("--teacher", type=Path, default=VMAF_MODEL,
                        help=f"the VMAF v0.6.1 model JSON (default {VMAF_MODEL}); without it, a ridge")
    args = parser.parse_args(argv)
    logging.getLogger("vmafx_sidecar").setLevel(logging.ERROR)  # each quarantine is a warning; the tables say it
    scale, rounds = (0.25, 2) if args.quick else (1.0, args.rounds)
    # The scenarios draw features in the VMAF model's normalised [0, 1] space.
    teacher = VmafTeacher.load(args.teacher).normalised_score if args.teacher.is_file() else ridge_teacher()
    print(f"machine: {machine()}\nteacher: "
          + (f"VMAF v0.6.1 ({args.teacher})" if args.teacher.is_file() else f"a ridge ({args.teacher} not found)"))
    run_scenarios(teacher, scale)
    print_validation(rounds, samples=4000 if args.quick else 64000)
    print_checkpoint(checkpoints=3 if args.quick else 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
