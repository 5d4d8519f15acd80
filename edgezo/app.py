"""Embedding edgezo in an on-device app: personalise in the background, score with the result.

::

    from edgezo import Personalizer

    p = Personalizer("bundle/", "jetson-orin-nano", app_dir="~/.myapp/edgezo")
    p.fit(notes, steps=500, on_progress=lambda pr: print(pr.step, pr.loss))  # returns at once
    ...                                    # the app goes on; fit runs in a worker thread
    p.pause(); p.resume(); p.cancel()      # from any thread; effective at a step boundary
    summary = p.wait()                     # the run's RunSummary (or the worker's error)
    p.score(["a new note"])                # per-text loss with the personalised weights

Everything lives in ``app_dir``: ``examples.jsonl`` (the examples of the last ``fit``) and
``run/`` (ledger, checkpoint, trained tensors, metrics). The worker is
:func:`edgezo.train.finetune` itself; pause and cancel go through its ``should_stop`` hook, so
a cancelled or budget-stopped fit leaves the ledger and a checkpoint that agree, and the next
``fit`` resumes the run where it stopped: fit, cancel, fit gives the same tensors, bit for bit,
as one uninterrupted fit (with the same examples). ``steps`` is the run's total, not a
per-call increment; raise it to train further.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .errors import EdgezoError

ProgressCallback = Callable[["Progress"], None]


@dataclass(frozen=True)
class Progress:
    """One step's report to ``on_progress`` (called in the worker thread)."""

    step: int  # steps done in the run (all sessions)
    steps: int  # the run's target
    loss: float  # this step's mean training loss over its evaluations
    evaluations: int  # training forward evaluations this session
    evaluations_left: int | None  # of the session's evaluation budget; None: unlimited
    seconds_left: float | None  # of the session's time budget; None: unlimited


class Personalizer:
    """Personalise ``bundle`` on a device ``profile`` (name, family, YAML path or None) with
    examples given in memory; state in ``app_dir``.

    Extra keyword arguments are :class:`edgezo.config.FinetuneConfig` fields (``batch_size``,
    ``max_length``, ``lr``, ``seed`` ...).
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        profile: Any = None,
        app_dir: str | os.PathLike = "edgezo-app",
        *,
        log: Callable[[str], None] | None = None,
        **config: Any,
    ):
        from .config import FinetuneConfig

        self.bundle = str(bundle)
        self.app_dir = Path(app_dir).expanduser()
        self.app_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = self.app_dir / "run"
        self.data_path = self.app_dir / "examples.jsonl"
        self.device = self._device_arg(profile)
        self.log = log or (lambda *a, **k: None)
        base = {"eval_every": 0, "steps": 200}
        base.update(config)
        FinetuneConfig(**{**base, "bundle": self.bundle})  # validate the fields now
        self.config = base
        self._go = threading.Event()
        self._go.set()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self._scorer: Any = None
        self._writer: Any = None

    def _device_arg(self, profile: Any) -> str | None:
        from .device.profiles import DeviceProfile

        if profile is None or isinstance(profile, (str, os.PathLike)):
            return None if profile is None else str(profile)
        if isinstance(profile, DeviceProfile):
            if profile.source is not None:
                return str(profile.source)
            import yaml

            path = self.app_dir / "profile.yaml"
            path.write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))
            return str(path)
        raise EdgezoError(
            f"profile must be a name, a path or a DeviceProfile, got {profile!r}",
            "pass e.g. 'laptop-cpu' or edgezo.device.resolve.load_profile(...)",
        )

    # -- training ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def paused(self) -> bool:
        return not self._go.is_set()

    def fit(
        self,
        examples: Iterable[dict[str, str]],
        *,
        steps: int | None = None,
        eval_budget: int | None = None,
        time_budget_s: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Personalizer:
        """Start (or resume) personalising on ``examples`` in a worker thread; returns at once.

        ``examples``: dicts ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``.
        ``eval_budget`` / ``time_budget_s`` cap this session (default: the profile's).
        Errors in the examples are raised here; errors of the run by :meth:`wait`.
        """
        from .config import FinetuneConfig
        from .data import read_jsonl

        if self.running:
            raise EdgezoError("a fit is already running", "wait(), or cancel() it first")
        rows = list(examples)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        check = self.data_path.with_suffix(".jsonl.check")
        check.write_text(text, encoding="utf-8")
        try:
            read_jsonl(check)  # raises a DataError naming the bad example (line = index + 1)
        finally:
            check.unlink(missing_ok=True)
        atomic.write_text(self.data_path, text)
        values = {
            **self.config,
            "bundle": self.bundle,
            "data": str(self.data_path),
            "out": str(self.run_dir),
            "device": self.device,
            "eval_budget": eval_budget,
            "time_budget_s": time_budget_s,
        }
        if steps is not None:
            values["steps"] = steps
        cfg = FinetuneConfig(**values)
        resume = (self.run_dir / "ledger.jsonl").is_file()
        self._cancel.clear()
        self._go.set()
        self._result = self._error = None
        self._scorer = None
        self._writer = None
        self._thread = threading.Thread(
            target=self._work, args=(cfg, resume, on_progress), name="edgezo-fit", daemon=True
        )
        self._thread.start()
        return self

    def _work(self, cfg: Any, resume: bool, on_progress: ProgressCallback | None) -> None:
        from .train import finetune

        def on_step(info: dict[str, Any]) -> None:
            if on_progress is not None:
                on_progress(
                    Progress(
                        info["step"],
                        info["steps"],
                        info["loss"],
                        info["evaluations"],
                        info["evaluations_left"],
                        info["seconds_left"],
                    )
                )

        try:
            self._result = finetune(
                cfg,
                resume=resume,
                log=self.log,
                progress=False,
                should_stop=self._should_stop,
                on_step=on_step,
            )
        except BaseException as e:  # handed to wait()
            self._error = e

    def _should_stop(self) -> bool:
        while not self._go.wait(0.05):  # paused: hold the worker at this step boundary
            if self._cancel.is_set():
                break
        return self._cancel.is_set()

    def pause(self) -> None:
        """Hold the worker at the next step boundary (time budgets keep running)."""
        self._go.clear()

    def resume(self) -> None:
        """Let a paused worker go on."""
        self._go.set()

    def cancel(self) -> None:
        """Stop after the step under way, with a checkpoint; the next fit resumes from it."""
        self._cancel.set()
        self._go.set()

    def wait(self, timeout: float | None = None):
        """Wait for the worker; its :class:`RunSummary` (None if still running at timeout).

        Re-raises the worker's error, if any."""
        if self._thread is None:
            return None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self._result

    # -- using the personalised weights -----------------------------------------------------

    def _runner(self):
        if self.running:
            raise EdgezoError(
                "the model is being personalised",
                "wait() for the fit (or cancel() it) before scoring",
            )
        if self._scorer is None:
            from .bundle import load_bundle
            from .device.limits import runtime_options
            from .device.resolve import load_profile
            from .runner import LossRunner, RuntimeOptions
            from .train import BATCH_INPUTS
            from .zo.params import FlatParams

            b = load_bundle(self.bundle)
            params = FlatParams(b.manifest.trainable)
            trained = self.run_dir / "trained.safetensors"
            # checked: this bundle's, its shapes, its checksum
            values = b.trainable_values(trained if trained.is_file() else None)
            params.load(values, where=str(trained if trained.is_file() else b.path))
            opts = RuntimeOptions()
            if self.device is not None:
                opts = runtime_options(load_profile(self.device))
            self._scorer = (b, LossRunner(b.model_path, params, BATCH_INPUTS, opts))
        return self._scorer

    def _losses(self, rows: list[dict[str, str]]) -> np.ndarray:
        from .data import eval_batches, tokenize

        b, runner = self._runner()
        spec = b.manifest.tokenizer
        examples = tokenize(
            list(enumerate(rows, 1)),
            b.tokenizer(),
            spec,
            int(self.config.get("max_length", 64)),
            where="examples",
        )
        size = int(self.config.get("eval_batch_size") or 16)
        return np.concatenate(
            [
                runner.losses(batch, heldout=True)
                for batch in eval_batches(examples, size, spec.pad_token_id)
            ]
        )

    def score(self, texts: Iterable[str]) -> list[float]:
        """Per-text loss (mean over its tokens) with the personalised weights: lower = more
        like what the model was personalised on."""
        return [float(x) for x in self._losses([{"text": t} for t in texts])]

    def loss(self, examples: Iterable[dict[str, str]]) -> float:
        """Mean per-example loss of ``examples`` with the personalised weights."""
        return float(np.mean(self._losses(list(examples)), dtype=np.float64))

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Iterable[str] = (),
        chat: bool = False,
        max_length: int = 256,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """Continue ``prompt`` with the personalised weights (the initial ones before any fit);
        greedy unless ``temperature > 0`` (then seeded by ``seed``). ``on_text`` receives the
        text piece by piece as it is generated (streaming); the whole continuation is returned.
        Uses the bundle's KV-cache decoding graph when it has one."""
        if self.running:
            raise EdgezoError(
                "the model is being personalised",
                "wait() for the fit (or cancel() it) before generating",
            )
        if self._writer is None:
            from .bundle import load_bundle
            from .device.limits import runtime_options
            from .device.resolve import load_profile
            from .generate import TextGenerator
            from .runner import RuntimeOptions

            b = load_bundle(self.bundle)
            opts = RuntimeOptions()
            if self.device is not None:
                opts = runtime_options(load_profile(self.device))
            writer = TextGenerator(b, opts)
            for note in writer.notes:
                self.log(f"note: {note}")
            trained = self.run_dir / "trained.safetensors"
            writer.load(trained if trained.is_file() else None)
            self._writer = writer
        rng = np.random.default_rng(seed) if temperature > 0 else None
        pieces = []
        for piece in self._writer.stream(
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            rng,
            max_length=max_length,
            stop=tuple(stop),
            chat=chat,
        ):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        return "".join(pieces)
